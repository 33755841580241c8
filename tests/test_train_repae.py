"""End-to-end runs of train_repae.py on a tiny CPU configuration."""
import json

import pytest
import torch

from helpers import make_dataset, run_script, tiny_training_flags
from loss.discriminator import NLayerDiscriminator
from models.autoencoder import vae_models
from models.sit import SiT_models
from utils.checkpoint import load_file

pytestmark = pytest.mark.slow

LPIPS = ["--lpips-random-init"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A 16-image, 2-class dataset at 32 px."""
    return make_dataset(tmp_path_factory.mktemp("repae_data"))


def train(data_dir, out, name, *extra, nproc=1, check=True, env=None, **overrides):
    """Run train_repae.py with the tiny flags; returns the CompletedProcess."""
    args = tiny_training_flags(data_dir, out, name, **overrides) + LPIPS + list(extra)
    return run_script("train_repae.py", *args, nproc=nproc, check=check, env=env)


def assert_same_state(a, b, where=""):
    """Nested state dicts / lists of tensors are exactly equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs (max {(a.double() - b.double()).abs().max()})"
    else:
        assert a == b, where


def first_state(optimizer_state):
    """The state of the first parameter an optimizer holds state for."""
    return next(iter(optimizer_state["state"].values()))


def test_short_run_writes_published_layout(data_dir, tmp_path):
    result = train(data_dir, tmp_path, "run", **{"--sampling-steps": 2})
    exp = tmp_path / "run"
    args = json.loads((exp / "args.json").read_text())
    assert args["model"] == "SiT-T/2" and args["vae_align_proj_coeff"] == 1.5 and args["enc_type"] == "dinov2-vit-s"
    assert "Saved checkpoint" in (exp / "log.txt").read_text()
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["0000002.pt", "0000004.pt"]
    for step in (1, 2, 4):  # step 1 and every --sampling-steps
        grid = (exp / "samples" / f"{step:07d}.png")
        assert grid.is_file()

    ckpt = load_file(exp / "checkpoints" / "0000004.pt")
    assert {"model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "args", "steps"} <= ckpt.keys()
    assert ckpt["steps"] == 4 and ckpt["args"].model == "SiT-T/2"
    sit = SiT_models["SiT-T/2"](input_size=4, in_channels=4, num_classes=2, z_dims=[384], encoder_depth=2)
    assert torch.equal(ckpt["model"]["pos_embed"], sit.pos_embed)  # the sin-cos embedding stays fixed
    sit.load_state_dict(ckpt["ema"], strict=True)
    sit.load_state_dict(ckpt["model"], strict=True)
    vae_models["f8d4-tiny"]().load_state_dict(ckpt["vae"], strict=True)
    NLayerDiscriminator().load_state_dict(ckpt["discriminator"], strict=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # The EMA has moved away from the initial weights but not as far as the model.
    assert not torch.equal(ckpt["ema"]["blocks.0.attn.qkv.weight"], ckpt["model"]["blocks.0.attn.qkv.weight"])
    assert "sit_loss=" in result.stderr  # progress bar with the main losses


def test_resume_reaches_the_same_weights(data_dir, tmp_path):
    # 16 images, batch 4: steps 1-4 are epoch 0 and 5-6 epoch 1, so the resume crosses an epoch boundary.
    train(data_dir, tmp_path, "straight", **{"--max-train-steps": 6, "--checkpointing-steps": 3})
    train(data_dir, tmp_path, "stopped", **{"--max-train-steps": 3, "--checkpointing-steps": 3})
    resumed = train(data_dir, tmp_path, "stopped", "--resume-latest", **{"--max-train-steps": 6, "--checkpointing-steps": 3})
    assert "Resumed from" in resumed.stderr + resumed.stdout + (tmp_path / "stopped" / "log.txt").read_text()

    straight = load_file(tmp_path / "straight" / "checkpoints" / "0000006.pt")
    again = load_file(tmp_path / "stopped" / "checkpoints" / "0000006.pt")
    for key in ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "rng", "data"):
        assert_same_state(straight[key], again[key], key)


def test_published_resume_flags(data_dir, tmp_path):
    train(data_dir, tmp_path, "first", **{"--max-train-steps": 2})
    train(data_dir, tmp_path, "second", **{"--max-train-steps": 3, "--resume-step": 2,
                                          "--continue-train-exp-dir": tmp_path / "first"})
    assert load_file(tmp_path / "second" / "checkpoints" / "0000003.pt")["steps"] == 3
    missing = train(data_dir, tmp_path, "third", check=False, **{"--resume-step": 7,
                                                                 "--continue-train-exp-dir": tmp_path / "first"})
    assert missing.returncode != 0 and "0000007.pt" in missing.stderr


def test_fresh_run_never_overwrites_checkpoints(data_dir, tmp_path):
    train(data_dir, tmp_path, "run", **{"--max-train-steps": 2})
    before = (tmp_path / "run" / "checkpoints" / "0000002.pt").read_bytes()
    again = train(data_dir, tmp_path, "run", check=False, **{"--max-train-steps": 2})
    assert again.returncode != 0 and "--resume-latest" in again.stderr
    assert (tmp_path / "run" / "checkpoints" / "0000002.pt").read_bytes() == before


def test_two_processes_with_gloo(data_dir, tmp_path):
    train(data_dir, tmp_path, "ddp", nproc=2, **{"--max-train-steps": 2, "--sampling-steps": 2})
    ckpt = load_file(tmp_path / "ddp" / "checkpoints" / "0000002.pt")
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert (tmp_path / "ddp" / "samples" / "0000002.png").is_file()
    # The batch-norm saw the global batch: its running statistics moved from the initial ones.
    assert ckpt["model"]["bn.num_batches_tracked"] == 2


def test_nonfinite_run_stops_without_checkpoint(data_dir, tmp_path):
    vae = vae_models["f8d4-tiny"]()
    state = vae.state_dict()
    state["encoder.conv_in.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan-vae.pt")
    torch.save({"latents_scale": torch.ones(1, 4, 1, 1), "latents_bias": torch.zeros(1, 4, 1, 1)},
               tmp_path / "nan-vae-latents-stats.pt")
    result = train(data_dir, tmp_path, "nan", check=False,
                   **{"--vae-ckpt": tmp_path / "nan-vae.pt", "--max-nonfinite-steps": 2})
    assert result.returncode != 0
    assert "2 consecutive steps had a non-finite loss or gradient" in result.stderr
    assert "update skipped" in (tmp_path / "nan" / "log.txt").read_text()
    assert not list((tmp_path / "nan" / "checkpoints").iterdir())


def test_bf16_autocast_on_cpu(data_dir, tmp_path):
    train(data_dir, tmp_path, "bf16", **{"--mixed-precision": "bf16", "--max-train-steps": 2})
    ckpt = load_file(tmp_path / "bf16" / "checkpoints" / "0000002.pt")
    assert ckpt["model"]["blocks.0.attn.qkv.weight"].dtype == torch.float32  # master weights stay fp32
    assert all(torch.isfinite(v).all() for v in ckpt["vae"].values())


def test_trackers_wandb_offline_and_tensorboard(data_dir, tmp_path):
    train(data_dir, tmp_path, "wb", env={"WANDB_DIR": str(tmp_path)},
          **{"--report-to": "wandb", "--max-train-steps": 2, "--sampling-steps": 2})
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    train(data_dir, tmp_path, "tb", **{"--report-to": "tensorboard", "--max-train-steps": 2})
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_ablation_switches(data_dir, tmp_path):
    train(data_dir, tmp_path, "base", **{"--max-train-steps": 2})
    train(data_dir, tmp_path, "frozen", "--freeze-vae", **{"--max-train-steps": 2})
    train(data_dir, tmp_path, "nostop", "--diffusion-loss-to-vae", "--log-latent-stats", **{"--max-train-steps": 2})
    base, frozen, nostop = (load_file(tmp_path / n / "checkpoints" / "0000002.pt") for n in ("base", "frozen", "nostop"))
    key = "encoder.conv_in.weight"
    assert not torch.equal(base["vae"][key], nostop["vae"][key])  # the diffusion gradient reached the VAE
    assert not torch.equal(base["vae"][key], frozen["vae"][key])
    # Frozen: two runs with --freeze-vae keep the same (initial) VAE whatever the step count.
    train(data_dir, tmp_path, "frozen1", "--freeze-vae", **{"--max-train-steps": 1, "--checkpointing-steps": 1})
    frozen1 = load_file(tmp_path / "frozen1" / "checkpoints" / "0000001.pt")
    assert_same_state(frozen1["vae"], frozen["vae"], "vae")


def test_gradient_accumulation_counts_optimization_steps(data_dir, tmp_path):
    train(data_dir, tmp_path, "accum", **{"--gradient-accumulation-steps": 2, "--max-train-steps": 2,
                                          "--batch-size": 4})
    ckpt = load_file(tmp_path / "accum" / "checkpoints" / "0000002.pt")
    # 2 optimization steps of 2 micro-batches each: the data position is 4 micro-batches into epoch 0.
    assert ckpt["steps"] == 2 and ckpt["data"] == {"epoch": 0, "batch_in_epoch": 4, "layout": [1, 4]}
    assert first_state(ckpt["opt"])["step"] == 2 and first_state(ckpt["opt_vae"])["step"] == 2


def test_two_process_resume_is_exact(data_dir, tmp_path):
    flags = {"--max-train-steps": 4, "--checkpointing-steps": 2}
    train(data_dir, tmp_path, "straight", nproc=2, **flags)
    train(data_dir, tmp_path, "stopped", nproc=2, **{**flags, "--max-train-steps": 2})
    train(data_dir, tmp_path, "stopped", "--resume-latest", nproc=2, **flags)
    straight = load_file(tmp_path / "straight" / "checkpoints" / "0000004.pt")
    again = load_file(tmp_path / "stopped" / "checkpoints" / "0000004.pt")
    for key in ("model", "ema", "vae", "discriminator", "opt", "rng"):
        assert_same_state(straight[key], again[key], key)


def test_resume_from_a_published_checkpoint(data_dir, tmp_path):
    train(data_dir, tmp_path, "ours", **{"--max-train-steps": 2})
    ours = load_file(tmp_path / "ours" / "checkpoints" / "0000002.pt")
    published_keys = ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "args", "steps")
    published = tmp_path / "published" / "checkpoints" / "0000002.pt"
    published.parent.mkdir(parents=True)
    torch.save({key: ours[key] for key in published_keys}, published)
    result = train(data_dir, tmp_path, "continued", **{"--max-train-steps": 3, "--resume-step": 2,
                                                       "--continue-train-exp-dir": tmp_path / "published"})
    assert "holds no random and data state" in result.stderr
    resumed = load_file(tmp_path / "continued" / "checkpoints" / "0000003.pt")
    assert resumed["steps"] == 3 and first_state(resumed["opt"])["step"] == 3
    # 16 images in batches of 4: step 2 ended after batch 2 of epoch 0, so step 3 used batch 3.
    assert resumed["data"]["epoch"] == 0 and resumed["data"]["batch_in_epoch"] == 3
