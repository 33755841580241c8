"""save_vae_weights.py: published outputs, statistics from the EMA batch-norm, overwrite guard, diffusers export."""
import argparse

import pytest
import torch

import save_vae_weights
from fixtures.fill import fill_
from helpers import TINY_VAE, assert_user_error, file_mode, run_script, tiny_sit, training_checkpoint, umask
from loss.discriminator import NLayerDiscriminator
from models.autoencoder import vae_models
from utils.errors import UserError
from weights.checkpoint import load_file, load_state_dict_strict
from weights.vae import load_vae


@pytest.fixture(scope="module")
def repae_ckpt(tmp_path_factory):
    """A REPA-E training checkpoint: f8d4-pico VAE, tiny SiT (batch-norm with statistics), discriminator."""
    torch.manual_seed(0)
    vae = vae_models[TINY_VAE]()
    sit = tiny_sit()
    checkpoint = training_checkpoint(sit, vae, steps=100, args=argparse.Namespace(vae=TINY_VAE, model="SiT-B/2"),
                                     discriminator=fill_(NLayerDiscriminator()).state_dict())
    path = tmp_path_factory.mktemp("repae") / "checkpoints" / "0000100.pt"
    path.parent.mkdir()
    torch.save(checkpoint, path)
    return path, checkpoint, sit


def test_published_command_line_outputs(repae_ckpt, tmp_path):
    path, checkpoint, _ = repae_ckpt
    run_script("save_vae_weights.py", "--repae-ckpt", path, "--vae-name", "e2e-tiny", "--save-dir", tmp_path / "exps",
               env={"CUDA_VISIBLE_DEVICES": ""})
    out = tmp_path / "exps" / "e2e-tiny"
    assert sorted(p.name for p in out.iterdir()) == [
        "e2e-tiny-discriminator-ckpt.pt", "e2e-tiny-latents-stats.pt", "e2e-tiny.pt"]

    # the VAE file is the checkpoint's VAE and loads strictly, with its statistics beside it
    vae_state = load_file(out / "e2e-tiny.pt")
    assert vae_state.keys() == checkpoint["vae"].keys()
    assert all(torch.equal(vae_state[k], checkpoint["vae"][k]) for k in vae_state)
    vae, stats = load_vae(TINY_VAE, out / "e2e-tiny.pt")

    running_var, running_mean = checkpoint["ema"]["bn.running_var"], checkpoint["ema"]["bn.running_mean"]
    assert set(stats) == {"latents_scale", "latents_bias"}
    assert stats["latents_scale"].shape == stats["latents_bias"].shape == (1, 4, 1, 1)
    torch.testing.assert_close(stats["latents_scale"].flatten(), running_var.rsqrt(), rtol=0, atol=0)
    torch.testing.assert_close(stats["latents_bias"].flatten(), running_mean, rtol=0, atol=0)

    load_state_dict_strict(NLayerDiscriminator(), load_file(out / "e2e-tiny-discriminator-ckpt.pt"), "discriminator")


def test_refuses_to_overwrite(repae_ckpt, tmp_path):
    path, checkpoint, _ = repae_ckpt
    argv = ["--repae-ckpt", str(path), "--vae-name", "v", "--save-dir", str(tmp_path)]
    stats_file = tmp_path / "v" / "v-latents-stats.pt"
    stats_file.parent.mkdir()
    stats_file.write_bytes(b"keep me")
    with pytest.raises(UserError, match="refusing to overwrite .*v-latents-stats.pt"):
        save_vae_weights.main(argv)
    assert stats_file.read_bytes() == b"keep me" and not (tmp_path / "v" / "v.pt").exists()
    outputs = save_vae_weights.main(argv + ["--overwrite"])
    assert set(outputs) == {"vae", "latents_stats", "discriminator"}
    assert torch.equal(load_file(stats_file)["latents_bias"].flatten(), checkpoint["ema"]["bn.running_mean"])
    assert not list(tmp_path.glob("v/.*"))  # no temporary files left


def test_rejects_checkpoints_without_vae(repae_ckpt, tmp_path):
    _, checkpoint, _ = repae_ckpt
    ldm = tmp_path / "ldm.pt"
    torch.save({k: checkpoint[k] for k in ("model", "ema", "args", "steps")}, ldm)
    with pytest.raises(UserError, match="no 'vae' entry: it is not a REPA-E training checkpoint"):
        save_vae_weights.main(["--repae-ckpt", str(ldm), "--save-dir", str(tmp_path)])
    bad = tmp_path / "bad.pt"
    torch.save({**checkpoint, "vae": {"encoder.conv_in.weight": torch.zeros(1)}}, bad)
    with pytest.raises(UserError, match="fits none of the autoencoder layouts"):
        save_vae_weights.main(["--repae-ckpt", str(bad), "--save-dir", str(tmp_path)])
    torch.save(checkpoint["vae"]["encoder.conv_in.weight"], bad)
    with pytest.raises(UserError, match=r"bad\.pt holds a Tensor, not a REPA-E training checkpoint"):
        save_vae_weights.main(["--repae-ckpt", str(bad), "--save-dir", str(tmp_path)])
    # an exported VAE given back: one line from the command, nothing written
    vae_file = tmp_path / "vae.pt"
    torch.save(checkpoint["vae"], vae_file)
    result = run_script("save_vae_weights.py", "--repae-ckpt", vae_file, "--save-dir", tmp_path / "exps",
                        check=False, cwd=tmp_path)
    assert_user_error(result, f"{vae_file} has no 'vae' entry: it is not a REPA-E training checkpoint (keys "
                              "encoder.conv_in.weight")
    assert not (tmp_path / "exps").exists()


def test_diffusers_export(repae_ckpt, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    path, checkpoint, _ = repae_ckpt
    with umask(0o022):
        outputs = save_vae_weights.main(["--repae-ckpt", str(path), "--vae-name", "e2e", "--save-dir",
                                         str(tmp_path), "--diffusers"])
    folder = tmp_path / "e2e" / "diffusers"
    assert outputs["diffusers"] == folder
    # what the user exports is readable by collaborators (not mkstemp's 0600 / mkdtemp's 0700)
    files = [outputs[kind] for kind in ("vae", "latents_stats", "discriminator")] + sorted(folder.iterdir())
    assert len(files) == 6 and {file_mode(f) for f in files} == {0o644} and file_mode(folder) == 0o755
    reference = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    ours, stats = load_vae(TINY_VAE, folder)
    stats_file = load_file(outputs["latents_stats"])
    for key in ("latents_scale", "latents_bias"):
        torch.testing.assert_close(stats[key].reshape(1, 4, 1, 1).float(), stats_file[key])
    torch.testing.assert_close(torch.tensor(reference.config.latents_mean).float(),
                               checkpoint["ema"]["bn.running_mean"])
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(reference.decode(z).sample, ours.decode(z), rtol=1e-4, atol=1e-4)
    assert not list((tmp_path / "e2e").glob(".*"))  # the temporary export folder was moved into place
