"""--vae diffusers: any diffusers AutoencoderKL trained end to end, exported back and used by every script.

Small random-weight AutoencoderKL folders of three layouts: FLUX/SD3.5-like (16 latent channels, 4 blocks, no quant
convs, shift_factor/scaling_factor), SD-XL-like (4 channels, 4 blocks, scaling_factor only) and one with 8 channels,
3 blocks (f4), attention blocks and per-channel latents_mean/latents_std.
"""
import argparse
import json

import diffusers
import numpy as np
import pytest
import torch
from huggingface_hub import constants

import generate
import save_vae_weights
from helpers import (
    FIXTURES,
    assert_same_state,
    file_mode,
    make_dataset,
    run_script,
    tiny_sit,
    tiny_training_flags,
    training_checkpoint,
    umask,
)
from models.autoencoder import DiffusersAutoencoder, latent_shape
from training.flags import check_training_args
from utils.errors import UserError
from weights.checkpoint import load_file
from weights.latent_stats import stats_from_batchnorm
from weights.training_checkpoint import load_autoencoder
from weights.vae import load_vae, resolve_vae, vae_checkpoint_entries, vae_from_checkpoint

FLUX_LIKE = dict(latent_channels=16, block_out_channels=[16, 16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False, use_post_quant_conv=False,
                 shift_factor=0.1159, scaling_factor=0.3611)
SDXL_LIKE = dict(latent_channels=4, block_out_channels=[16, 32, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.13025)
F4C8 = dict(latent_channels=8, block_out_channels=[16, 32, 32],
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
            up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"], scaling_factor=0.5,
            latents_mean=[0.1 * i for i in range(8)], latents_std=[1.0 + 0.1 * i for i in range(8)])
LAYOUTS = {"flux-like": FLUX_LIKE, "sdxl-like": SDXL_LIKE, "f4c8": F4C8}
# the fast tier checks one layout (f4c8: attention in the encoder, latents_mean/std in the config); the slow tier all
LAYOUT_PARAMS = [name if name == "f4c8" else pytest.param(name, marks=pytest.mark.slow) for name in LAYOUTS]
# SiT patch size per downsampling factor, so that 32-px images give the 2x2 tokens of a 32-px DINOv2
SIT_FOR_FACTOR = {8: "SiT-P/2", 4: "SiT-P/4"}


def write_folder(folder, config, seed=0):
    """A random-weight diffusers AutoencoderKL folder (save_pretrained); returns the folder."""
    torch.manual_seed(seed)
    diffusers.AutoencoderKL(**config, layers_per_block=1, norm_num_groups=8, sample_size=32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """{layout name: diffusers folder}."""
    root = tmp_path_factory.mktemp("diffusers_vaes")
    return {name: write_folder(root / name, config) for name, config in LAYOUTS.items()}


def images(n=2, size=32):
    """Images in [-1, 1]."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def assert_same_outputs(ours, reference):
    """Posterior moments and decoding of the wrapper and a diffusers AutoencoderKL are exactly equal."""
    x = images()
    with torch.no_grad():
        posterior, theirs = ours.encode(x), reference.encode(x).latent_dist
        assert torch.equal(posterior.mean, theirs.mean) and torch.equal(posterior.std, theirs.std)
        assert torch.equal(ours.decode(posterior.mean), reference.decode(posterior.mean).sample)


@pytest.mark.parametrize("name", LAYOUT_PARAMS)
def test_wrapper_follows_the_autoencoder_contract(folders, name):
    config = LAYOUTS[name]
    vae, stats = load_vae("diffusers", folders[name])
    reference = diffusers.AutoencoderKL.from_pretrained(folders[name]).eval()
    assert isinstance(vae, DiffusersAutoencoder) and not vae.training
    assert list(vae.state_dict()) == list(reference.state_dict())  # exactly diffusers' keys
    assert_same_outputs(vae, reference)
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    assert (vae.latent_channels, vae.downsample_factor) == (config["latent_channels"], factor)
    assert latent_shape(vae, 32) == (config["latent_channels"], 32 // factor, 32 // factor)
    assert resolve_vae("diffusers", str(folders[name])).downsample_factor() == factor
    posterior, z, recon = vae(images())
    assert z.shape == (2, *latent_shape(vae, 32)) and recon.shape == (2, 3, 32, 32) and posterior.kl().shape == (2,)


def test_latent_statistics_start_from_the_config(folders):
    channels = 16
    flux = load_vae("diffusers", folders["flux-like"])[1]
    assert torch.equal(flux["latents_scale"], torch.full((1, channels, 1, 1), 0.3611))
    assert torch.equal(flux["latents_bias"], torch.full((1, channels, 1, 1), 0.1159))
    sdxl = load_vae("diffusers", folders["sdxl-like"])[1]
    assert torch.equal(sdxl["latents_scale"], torch.full((1, 4, 1, 1), 0.13025)) and not sdxl["latents_bias"].any()
    # diffusers' convention (z - latents_mean) * scaling_factor / latents_std
    f4c8 = load_vae("diffusers", folders["f4c8"])[1]
    torch.testing.assert_close(f4c8["latents_scale"].flatten(), 0.5 / torch.tensor(F4C8["latents_std"]))
    torch.testing.assert_close(f4c8["latents_bias"].flatten(), torch.tensor(F4C8["latents_mean"]))


def test_config_without_statistics_gives_none(tmp_path):
    write_folder(tmp_path, SDXL_LIKE)
    config = json.loads((tmp_path / "config.json").read_text())  # save_pretrained writes every default: drop them
    for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_vae("diffusers", tmp_path, require_stats=False)[1] is None
    with pytest.raises(UserError, match="latents_stats.pt or latent statistics in its config.json"):
        load_vae("diffusers", tmp_path)


def test_grad_checkpointing_gives_the_same_gradients(folders):
    grads = []
    for enabled in (False, True):
        vae = load_vae("diffusers", folders["flux-like"])[0].train()
        vae.set_grad_checkpointing(enabled)
        _, z, recon = vae(images(), sample_posterior=False)
        (recon.square().mean() + z.square().mean()).backward()
        grads.append([p.grad for p in vae.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_bad_vae_ckpt_is_one_line(folders, tmp_path):
    with pytest.raises(UserError, match="--vae diffusers needs a VAE checkpoint: pass --vae-ckpt"):
        load_vae("diffusers", "none")
    (tmp_path / "vae.pt").write_bytes(b"")
    with pytest.raises(UserError, match="weights file, but --vae diffusers needs a diffusers AutoencoderKL folder"):
        load_vae("diffusers", str(tmp_path / "vae.pt"))
    args = argparse.Namespace(model="SiT-T/2", vae="diffusers", vae_ckpt=str(folders["flux-like"]), resolution=36)
    with pytest.raises(UserError, match="36x36 pixels do not fit --vae diffusers: its downsampling factor 8"):
        check_training_args(args)
    # a layout of our own classes refuses the folder, naming the way out
    with pytest.raises(UserError, match="pass --vae diffusers"):
        load_vae("f8d4", str(folders["flux-like"]))


def test_hub_subfolder_of_a_pipeline_repo(folders, tmp_path, monkeypatch):
    """hf://OWNER/NAME/vae: the vae/ folder of a text-to-image pipeline repo, here from a hand-made offline cache."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / "models--owner--pipeline"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    write_folder(storage / "snapshots" / commit / "vae", FLUX_LIKE)
    vae, stats = load_vae("diffusers", "hf://owner/pipeline/vae")
    assert_same_outputs(vae, diffusers.AutoencoderKL.from_pretrained(folders["flux-like"]).eval())
    assert resolve_vae("diffusers", "hf://owner/pipeline/vae").downsample_factor() == 8


def tiny_repae_checkpoint(vae):
    """A REPA-E training checkpoint around `vae` (the layout train_repae.py writes), with a tiny SiT."""
    torch.manual_seed(0)
    sit = tiny_sit(in_channels=vae.latent_channels, depth=1, num_classes=2)
    with torch.no_grad():
        sit.bn.running_mean.uniform_(-1, 1)
        sit.bn.running_var.uniform_(0.5, 2)
    return training_checkpoint(sit, vae, steps=1, discriminator={}, **vae_checkpoint_entries("diffusers", vae))


@pytest.mark.parametrize("name", LAYOUT_PARAMS)
def test_export_loads_in_diffusers_and_matches_the_trained_weights(folders, name, tmp_path):
    vae = load_vae("diffusers", folders[name])[0]
    with torch.no_grad():  # "trained" weights: unlike the folder's
        next(vae.parameters()).add_(0.01)
    checkpoint = tiny_repae_checkpoint(vae)
    path = tmp_path / "0000001.pt"
    torch.save(checkpoint, path)
    with umask(0o022):
        outputs = save_vae_weights.main(["--repae-ckpt", str(path), "--vae-name", "tuned", "--save-dir",
                                         str(tmp_path)])
    assert set(outputs) == {"latents_stats", "discriminator", "diffusers"}  # no NAME.pt: weights need their config
    assert {file_mode(file) for file in outputs["diffusers"].iterdir()} == {0o644}  # none private
    exported = diffusers.AutoencoderKL.from_pretrained(outputs["diffusers"]).eval()
    assert_same_outputs(vae_from_checkpoint("diffusers", checkpoint, path), exported)
    config = json.loads((folders[name] / "config.json").read_text())
    for key, value in json.loads((outputs["diffusers"] / "config.json").read_text()).items():
        if key not in ("latents_mean", "latents_std", "_diffusers_version"):
            assert config.get(key) == value, key  # the original class, layout, scaling_factor and shift_factor
    # the trained statistics (the EMA batch-norm's) come back exactly from the file, closely from the config
    stats = stats_from_batchnorm(checkpoint["ema"]["bn.running_mean"], checkpoint["ema"]["bn.running_var"])
    assert_same_state(load_vae("diffusers", outputs["diffusers"])[1], stats)
    assert_same_state(load_file(outputs["latents_stats"]), stats)
    (outputs["diffusers"] / "latents_stats.pt").unlink()
    from_config = load_vae("diffusers", outputs["diffusers"])[1]
    for key in stats:
        torch.testing.assert_close(from_config[key], stats[key])


def test_generate_needs_the_config_of_a_diffusers_checkpoint(folders):
    checkpoint = tiny_repae_checkpoint(load_vae("diffusers", folders["flux-like"])[0])
    del checkpoint["vae_config"]
    with pytest.raises(UserError, match="has no 'vae_config' entry"):
        load_autoencoder({"vae": "diffusers"}, checkpoint, "ckpt.pt", None, "cpu")


# End-to-end runs of the scripts.

@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A 16-image, 2-class dataset at 32 px: 4 batches of 4 per epoch."""
    return make_dataset(tmp_path_factory.mktemp("diffusers_data"))


def train(script, data_dir, out, name, folder, *extra, **overrides):
    """Run a trainer with the tiny flags on the diffusers VAE `folder`."""
    factor = resolve_vae("diffusers", str(folder)).downsample_factor()
    flags = {"--vae": "diffusers", "--vae-ckpt": folder, "--model": SIT_FOR_FACTOR[factor], **overrides}
    return run_script(script, *tiny_training_flags(data_dir, out, name, **flags), *extra)


REPAE = ("--lpips-random-init", "--loss-cfg-path", FIXTURES / "tiny_vae_loss_scratch_disc.yaml")


@pytest.fixture(scope="session")
def flux_run(data_dir, folders, tmp_path_factory):
    """4 REPA-E steps on the FLUX-like VAE, checkpoints at 2 and 4, discriminator from scratch; the out dir."""
    out = tmp_path_factory.mktemp("flux_run")
    train("train_repae.py", data_dir, out, "straight", folders["flux-like"], *REPAE,
          **{"--max-train-steps": 4, "--checkpointing-steps": 2, "--sampling-steps": 4})
    return out


@pytest.mark.slow
def test_training_checkpoint_keeps_diffusers_keys_and_config(flux_run, folders):
    exp = flux_run / "straight"
    second, fourth = (load_file(exp / "checkpoints" / f"000000{step}.pt") for step in (2, 4))
    reference = diffusers.AutoencoderKL.from_pretrained(folders["flux-like"])
    assert second["vae"].keys() == reference.state_dict().keys()
    assert fourth["vae_config"] == load_vae("diffusers", folders["flux-like"])[0].config
    assert json.loads((exp / "args.json").read_text())["vae"] == "diffusers"
    assert second["ema"]["bn.running_mean"].shape == (16,)
    # the VAE and the scratch discriminator (warm-up: its adversarial term is still off) both train
    assert not torch.equal(second["vae"]["encoder.conv_in.weight"], fourth["vae"]["encoder.conv_in.weight"])
    assert not torch.equal(second["discriminator"]["main.0.weight"], fourth["discriminator"]["main.0.weight"])
    assert (exp / "samples" / "0000004.png").is_file()


@pytest.mark.slow
def test_resume_reaches_the_same_weights(flux_run, data_dir, folders, tmp_path):
    flags = {"--checkpointing-steps": 2, "--sampling-steps": 4}
    train("train_repae.py", data_dir, tmp_path, "stopped", folders["flux-like"], *REPAE,
          **{**flags, "--max-train-steps": 2})
    train("train_repae.py", data_dir, tmp_path, "stopped", folders["flux-like"], *REPAE, "--resume-latest",
          **{**flags, "--max-train-steps": 4})
    straight = load_file(flux_run / "straight" / "checkpoints" / "0000004.pt")
    again = load_file(tmp_path / "stopped" / "checkpoints" / "0000004.pt")
    for key in ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "vae_config"):
        assert_same_state(straight[key], again[key], key)


@pytest.mark.slow
def test_export_cache_ldm_and_sampling(flux_run, data_dir, tmp_path):
    ckpt = flux_run / "straight" / "checkpoints" / "0000004.pt"
    outputs = save_vae_weights.main(["--repae-ckpt", str(ckpt), "--vae-name", "e2e-flux", "--save-dir",
                                     str(tmp_path / "pretrained")])
    checkpoint = load_file(ckpt)
    exported = diffusers.AutoencoderKL.from_pretrained(outputs["diffusers"]).eval()
    assert_same_outputs(vae_from_checkpoint("diffusers", checkpoint, ckpt), exported)
    sampling = ["--num-fid-samples", "2", "--pproc-batch-size", "2", "--num-steps", "2", "--cfg-scale", "1.0"]
    npz = generate.main(["--ckpt", str(ckpt), "--sample-dir", str(tmp_path / "samples"), *sampling])
    assert np.load(npz)["arr_0"].shape == (2, 32, 32, 3)

    folder = outputs["diffusers"]
    run_script("cache_latents.py", "--vae-arch", "diffusers", "--vae-ckpt-path", folder, "--vae-latents-name",
               "e2e-flux", "--data-dir", data_dir, "--output-dir", data_dir, "--pproc-batch-size", 8,
               "--num-workers", 0)
    train("train_ldm_only.py", data_dir, tmp_path / "exps", "ldm", folder, "--vae-latents-name", "e2e-flux",
          **{"--max-train-steps": 2, "--checkpointing-steps": 2, "--sampling-steps": 2})
    ldm = load_file(tmp_path / "exps" / "ldm" / "checkpoints" / "0000002.pt")
    stats = stats_from_batchnorm(checkpoint["ema"]["bn.running_mean"], checkpoint["ema"]["bn.running_var"])
    torch.testing.assert_close(ldm["ema"]["bn.running_mean"], stats["latents_bias"].flatten())
    npz = generate.main(["--exp-path", str(tmp_path / "exps" / "ldm"), "--sample-dir", str(tmp_path / "samples"),
                         *sampling])
    assert np.load(npz)["arr_0"].shape == (2, 32, 32, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdxl-like", "f4c8"])
def test_other_layouts_train_and_export(data_dir, folders, name, tmp_path):
    train("train_repae.py", data_dir, tmp_path, name, folders[name], *REPAE,
          **{"--max-train-steps": 2, "--checkpointing-steps": 2, "--sampling-steps": 2})
    ckpt = tmp_path / name / "checkpoints" / "0000002.pt"
    outputs = save_vae_weights.main(["--repae-ckpt", str(ckpt), "--save-dir", str(tmp_path / "pretrained")])
    exported = diffusers.AutoencoderKL.from_pretrained(outputs["diffusers"]).eval()
    assert_same_outputs(vae_from_checkpoint("diffusers", load_file(ckpt), ckpt), exported)


def test_evaluation_tools_load_the_same_vae(folders):
    from weights.vae import load_vaes

    vaes = load_vaes("diffusers", [str(folders["f4c8"])], (32, 32))
    assert isinstance(vaes[str(folders["f4c8"])], DiffusersAutoencoder)
    with pytest.raises(UserError, match="do not fit --vae diffusers"):
        load_vaes("diffusers", [str(folders["flux-like"])], (36, 36))
