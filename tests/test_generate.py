"""generate.py: published folder name, seeds and numbering; restart; REPA-E and LDM-only checkpoints; flags."""
import argparse
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import generate
import sampling.samplers
from fixtures.fill import fill_
from helpers import TINY_VAE, assert_user_error, file_mode, run_script, training_checkpoint, umask
from models.autoencoder import to_uint8_hwc, vae_models
from models.sit import SiT_models
from sampling.samplers import euler_maruyama_sampler, euler_sampler
from utils.errors import UserError, report_user_errors
from weights.latent_stats import denormalize_latents, stats_from_batchnorm

# The smoke-size SiT of the registry: generate.py builds models by registry name.
TINY_NAME = "SiT-P/2"
NUM_CLASSES = 10
RESOLUTION = 32  # 4x4 latents
STEP = 100


def training_args(vae_ckpt):
    """The model settings a training run records (a subset of the published args.json)."""
    return dict(model=TINY_NAME, vae=TINY_VAE, resolution=RESOLUTION, enc_type="dinov2-vit-b", encoder_depth=1,
                num_classes=NUM_CLASSES, cfg_prob=0.1, qk_norm=False, fused_attn=True, bn_momentum=0.1,
                vae_ckpt=vae_ckpt, exp_name="ignored")


def tiny_sit():
    """EMA SiT with deterministic non-trivial weights; its batch-norm holds latent statistics."""
    model = SiT_models[TINY_NAME](input_size=RESOLUTION // 8, in_channels=4, num_classes=NUM_CLASSES, z_dims=[16],
                                  projector_dim=32, encoder_depth=1)
    return fill_(model).eval()


def write_experiment(exp_dir, checkpoint, config):
    """EXP/args.json and EXP/checkpoints/%07d.pt as training writes them."""
    (exp_dir / "checkpoints").mkdir(parents=True)
    (exp_dir / "args.json").write_text(json.dumps(config, indent=4))
    torch.save(checkpoint, exp_dir / "checkpoints" / f"{STEP:07d}.pt")
    return exp_dir


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A REPA-E experiment (VAE inside) and a latent-diffusion-only one (VAE file named in args.json)."""
    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    vae = vae_models[TINY_VAE]().eval()
    model = tiny_sit()
    vae_file = root / "pretrained" / "tiny-vae" / "tiny-vae.pt"
    vae_file.parent.mkdir(parents=True)
    torch.save(vae.state_dict(), vae_file)
    # statistics unlike the batch-norm's, so a test can tell which ones were used
    file_stats = {"latents_scale": torch.tensor([0.5, 2.0, 1.0, 0.25]).view(1, 4, 1, 1),
                  "latents_bias": torch.tensor([0.3, -0.2, 0.0, 0.1]).view(1, 4, 1, 1)}
    torch.save(file_stats, vae_file.with_name("tiny-vae-latents-stats.pt"))
    config = training_args(str(vae_file))
    namespace = argparse.Namespace(**config)
    repae = write_experiment(root / "exps" / "tiny-repae", training_checkpoint(model, vae, steps=STEP, args=namespace),
                             config)
    ldm = write_experiment(root / "exps" / "tiny-ldm", training_checkpoint(model, steps=STEP, args=namespace), config)
    bn_stats = stats_from_batchnorm(model.bn.running_mean, model.bn.running_var)
    return dict(root=root, repae=repae, ldm=ldm, model=model, vae=vae, file_stats=file_stats, bn_stats=bn_stats)


@torch.no_grad()
def expected_batches(setup, stats, seed, n, batches, sde=False, vae=None, **kwargs):
    """Images of the published stream: one seed, then per batch noise, labels, sampler, decode (uint8 NHWC)."""
    torch.manual_seed(seed)
    out = []
    for _ in range(batches):
        z = torch.randn(n, 4, RESOLUTION // 8, RESOLUTION // 8)
        y = torch.randint(0, NUM_CLASSES, (n,))
        sampler = euler_maruyama_sampler if sde else euler_sampler
        latents = sampler(setup["model"], z, y, **kwargs).float()
        vae = vae or setup["vae"]
        images = vae.decode(denormalize_latents(latents, stats))
        out.append(to_uint8_hwc(images))
    return out


def read_png(path):
    with Image.open(path) as image:
        return np.asarray(image)


def test_published_folder_seed_numbering_and_npz(setup, tmp_path, capsys):
    samples = tmp_path / "samples"
    argv = ["--exp-path", str(setup["repae"]), "--train-steps", str(STEP), "--sample-dir", str(samples),
            "--global-seed", "2", "--pproc-batch-size", "2", "--num-fid-samples", "3", "--num-steps", "3",
            "--heun", "--cfg-scale", "1.5"]
    npz = generate.main(argv)
    folder = samples / f"tiny-repae_{STEP:07d}_cfg1.5-0.0-1.0"
    assert npz == folder.with_name(folder.name + ".npz")
    # every batch is sampled in full: 2 batches of 2, the .npz keeps the first 3
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    # one process: seed (2 + 0) * 1 // 2 = 1
    stats = setup["bn_stats"]
    want = np.concatenate(expected_batches(setup, stats, seed=1, n=2, batches=2, num_steps=3, heun=True,
                                           cfg_scale=1.5))
    got = np.stack([read_png(folder / f"{i:06d}.png") for i in range(4)])
    assert got.dtype == np.uint8 and got.shape == (4, RESOLUTION, RESOLUTION, 3)
    np.testing.assert_array_equal(got, want)
    assert len({image.tobytes() for image in got}) == 4
    with np.load(npz) as data:
        assert list(data.keys()) == ["arr_0"]
        np.testing.assert_array_equal(data["arr_0"], got[:3])

    # an existing .npz made with the same settings: nothing to do
    assert generate.main(argv) == npz
    assert f"Skipping sampling as {npz} already exists." in capsys.readouterr().out
    # without it, PNGs of other settings are not mixed in
    npz.unlink()
    with pytest.raises(UserError, match="other settings"):
        generate.main(argv + ["--num-steps", "4"])


@pytest.mark.slow
def test_compile_gives_the_eager_images(setup, tmp_path):
    """--compile: one compiled graph per batch shape (guidance off at t=1, on after), the same images."""
    import torch._dynamo

    torch._dynamo.reset()
    npz = generate.main(["--exp-path", str(setup["repae"]), "--sample-dir", str(tmp_path), "--global-seed", "2",
                         "--pproc-batch-size", "2", "--num-fid-samples", "2", "--num-steps", "3", "--heun",
                         "--cfg-scale", "1.5", "--guidance-high", "0.7", "--compile"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    want = expected_batches(setup, setup["bn_stats"], seed=1, n=2, batches=1, num_steps=3, heun=True,
                            cfg_scale=1.5, guidance_high=0.7)[0]
    with np.load(npz) as data:
        got = data["arr_0"]
    # float rounding may differ from eager's (on this machine's CPU it does not): a pixel may move by one level
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_existing_npz_needs_no_checkpoint(tmp_path, capsys):
    npz = tmp_path / "exp_0000007_cfg1.5-0.0-1.0.npz"
    npz.write_bytes(b"")
    out = generate.main(["--ckpt", str(tmp_path / "exp" / "checkpoints" / "7.pt"), "--sample-dir", str(tmp_path)])
    assert out == npz
    assert "already exists" in capsys.readouterr().out


def test_npz_records_its_settings_and_refuses_other_ones(setup, tmp_path, capsys):
    samples = tmp_path / "samples"
    argv = ["--exp-path", str(setup["repae"]), "--sample-dir", str(samples), "--pproc-batch-size", "1",
            "--num-fid-samples", "1", "--num-steps", "2"]
    with umask(0o022):
        npz = generate.main(argv)
    record = npz.with_name(npz.name.removesuffix(".npz") + ".settings.json")
    folder = npz.with_name(npz.name.removesuffix(".npz"))
    # readable by collaborators, like any file the user writes (not mkstemp's private 0600)
    assert [file_mode(p) for p in (npz, record, folder / "000000.png", folder / "sampling.json")] == [0o644] * 4
    recorded = json.loads(record.read_text())
    assert recorded["num_steps"] == 2 and recorded["num_fid_samples"] == 1 and recorded["step"] == f"{STEP:07d}"
    assert recorded["checkpoint"] == str((setup["repae"] / "checkpoints" / f"{STEP:07d}.pt").resolve())
    written = npz.read_bytes()

    with pytest.raises(UserError) as error:
        generate.main(argv[:-1] + ["3", "--num-fid-samples", "2"])
    message = str(error.value)
    assert "num_steps: 2 recorded, 3 now" in message and "num_fid_samples: 1 recorded, 2 now" in message
    assert str(npz) in message and "--sample-dir" in message and "global_seed" not in message
    assert npz.read_bytes() == written and json.loads(record.read_text()) == recorded

    capsys.readouterr()
    assert generate.main(argv) == npz  # the same settings: nothing to do
    assert capsys.readouterr().out.strip() == f"Skipping sampling as {npz} already exists."
    record.unlink()  # an .npz of older code: its settings are unknown, so it is kept as it is
    assert generate.main(argv[:-1] + ["3"]) == npz
    assert "its settings are unknown" in capsys.readouterr().out and npz.read_bytes() == written


def test_bad_checkpoints_end_with_one_line_and_write_nothing(setup, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("step 100 looked fine\n")
    state_dict = tmp_path / "weights.pt"
    torch.save(setup["model"].state_dict(), state_dict)
    samples = tmp_path / "samples"
    with pytest.raises(UserError, match=r"weights\.pt holds keys .*not a training checkpoint with 'ema' weights"):
        generate.main(["--ckpt", str(state_dict), "--sample-dir", str(samples), "--num-fid-samples", "1"])
    result = run_script("generate.py", "--ckpt", text, "--sample-dir", samples, check=False, cwd=tmp_path)
    assert_user_error(result, text, "not a PyTorch or safetensors checkpoint")
    assert not samples.exists()


@pytest.mark.parametrize("flags, sampler, expected", [
    ([], "euler_sampler", dict(num_steps=2, heun=False, cfg_scale=1.5, guidance_low=0.0, guidance_high=1.0,
                               path_type="linear")),
    (["--heun", "--path-type", "cosine"], "euler_sampler", dict(heun=True, path_type="cosine")),
    (["--mode", "sde", "--cfg-scale", "4.0", "--guidance-low", "0.2", "--guidance-high", "0.7"],
     "euler_maruyama_sampler", dict(cfg_scale=4.0, guidance_low=0.2, guidance_high=0.7)),
])
def test_sampler_flags(setup, tmp_path, monkeypatch, flags, sampler, expected):
    calls = []
    for name in ("euler_sampler", "euler_maruyama_sampler"):
        real = getattr(sampling.samplers, name)
        monkeypatch.setattr(sampling.samplers, name,
                            lambda real=real, name=name, **kw: calls.append((name, kw)) or real(**kw))
    # --ckpt alone: model settings from the checkpoint's own args, name from EXP/checkpoints/N.pt
    ckpt = setup["repae"] / "checkpoints" / f"{STEP:07d}.pt"
    npz = generate.main(["--ckpt", str(ckpt), "--sample-dir", str(tmp_path), "--pproc-batch-size", "1",
                         "--num-fid-samples", "1", "--num-steps", "2"] + flags)
    assert npz.name.startswith(f"tiny-repae_{STEP:07d}_cfg") and npz.is_file()
    assert [name for name, _ in calls] == [sampler]
    for key, value in expected.items():
        assert calls[0][1][key] == value, key


def test_ldm_only_checkpoint_uses_vae_file_and_its_stats(setup, tmp_path):
    argv = ["--exp-path", str(setup["ldm"]), "--sample-dir", str(tmp_path), "--pproc-batch-size", "2",
            "--num-fid-samples", "2", "--num-steps", "2", "--cfg-scale", "1.0"]
    npz = generate.main(argv)  # --train-steps defaults to the newest checkpoint
    assert npz.name == f"tiny-ldm_{STEP:07d}_cfg1.0-0.0-1.0.npz"
    want = expected_batches(setup, setup["file_stats"], seed=0, n=2, batches=1, num_steps=2, cfg_scale=1.0)[0]
    other = expected_batches(setup, setup["bn_stats"], seed=0, n=2, batches=1, num_steps=2, cfg_scale=1.0)[0]
    assert not np.array_equal(want, other)
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["arr_0"], want)


def test_vae_override_keeps_batchnorm_stats_of_repae_checkpoints(setup, tmp_path):
    vae = copy.deepcopy(setup["vae"])
    with torch.no_grad():
        vae.post_quant_conv.bias.add_(0.5)
    other = tmp_path / "other-vae.pt"  # no statistics file beside it: none needed
    torch.save(vae.state_dict(), other)
    npz = generate.main(["--exp-path", str(setup["repae"]), "--sample-dir", str(tmp_path), "--vae-ckpt", str(other),
                         "--pproc-batch-size", "2", "--num-fid-samples", "2", "--num-steps", "2"])
    stats = setup["bn_stats"]
    want = expected_batches(setup, stats, seed=0, n=2, batches=1, vae=vae, num_steps=2, cfg_scale=1.5)[0]
    inside = expected_batches(setup, stats, seed=0, n=2, batches=1, num_steps=2, cfg_scale=1.5)[0]
    assert not np.array_equal(want, inside)
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["arr_0"], want)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        generate.main(["--exp-path", str(tmp_path / "exp"), "--train-steps", "5", "--sample-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_missing_experiment_folder_or_checkpoints_end_with_one_line(tmp_path):
    exp = tmp_path / "exp"
    argv = ["--exp-path", str(exp), "--sample-dir", str(tmp_path / "samples")]
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(generate.main)(argv)
    assert str(exit_info.value) == f"error: --exp-path {exp}: no such folder; pass the folder of a training run"
    exp.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(generate.main)(argv)
    assert str(exit_info.value) == f"error: no checkpoints in {exp / 'checkpoints'}: pass --train-steps or --ckpt"
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(generate.main)(["--ckpt", str(exp), "--sample-dir", str(tmp_path / "samples")])
    assert str(exit_info.value) == (f"error: {exp} is a folder, not a checkpoint file: pass a .pt/.pth or "
                                    ".safetensors file")
    assert sorted(tmp_path.iterdir()) == [exp]


def test_ldm_only_checkpoint_without_vae_file(setup, tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(UserError, match="--vae-ckpt .*nowhere.pt: no such file"):
        generate.main(["--exp-path", str(setup["ldm"]), "--sample-dir", str(tmp_path), "--vae-ckpt", str(missing),
                       "--num-fid-samples", "1", "--pproc-batch-size", "1", "--num-steps", "1"])


def torchrun(argv):
    """generate.py in two gloo processes on CPU."""
    return run_script("generate.py", *argv, nproc=2, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)


def png_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.mark.slow
def test_torchrun_two_processes_published_layout_and_restart(setup, tmp_path):
    argv = ["--exp-path", str(setup["repae"]), "--train-steps", str(STEP), "--global-seed", "3",
            "--pproc-batch-size", "2", "--num-fid-samples", "6", "--num-steps", "3", "--mode", "sde",
            "--cfg-scale", "2.0", "--guidance-low", "0.2", "--guidance-high", "0.8",
            "--sample-dir", str(tmp_path / "samples")]
    folder = tmp_path / "samples" / f"tiny-repae_{STEP:07d}_cfg2.0-0.2-0.8"
    npz = folder.with_name(folder.name + ".npz")
    torchrun(argv)
    first = png_bytes(folder)
    assert sorted(first) == [f"{i:06d}.png" for i in range(8)]  # 2 batches x 2 processes x 2 images

    # published layout: rank r uses seed (3 + r) * 2 // 2 and writes image i of batch b as i * 2 + r + 4 * b
    stats = setup["bn_stats"]
    for rank in range(2):
        batches = expected_batches(setup, stats, seed=(3 + rank) * 2 // 2, n=2, batches=2, sde=True, num_steps=3,
                                   cfg_scale=2.0, guidance_low=0.2, guidance_high=0.8)
        for b, images in enumerate(batches):
            for i, want in enumerate(images):
                got = read_png(folder / f"{i * 2 + rank + 4 * b:06d}.png")
                # another process may round a float differently: allow one grey level
                assert np.abs(got.astype(int) - want).max() <= 1
    with np.load(npz) as data:
        first_npz = data["arr_0"]
    assert first_npz.shape == (6, RESOLUTION, RESOLUTION, 3) and first_npz.dtype == np.uint8
    np.testing.assert_array_equal(first_npz, np.stack([read_png(folder / f"{i:06d}.png") for i in range(6)]))

    # restart after losing one image of rank 1's first batch and one of rank 0's second batch (SDE noise
    # included): those batches come out byte-identical, complete batches are not sampled again
    (folder / "000001.png").unlink()
    (folder / "000006.png").unlink()
    npz.unlink()
    untouched = {p: (folder / p).stat().st_mtime_ns for p in ("000000.png", "000002.png", "000005.png")}
    torchrun(argv)
    assert png_bytes(folder) == first
    assert {p: (folder / p).stat().st_mtime_ns for p in untouched} == untouched
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["arr_0"], first_npz)
