"""End-to-end runs of train_ldm_only.py on the latents the session's pipeline cached from its exported VAE."""
import pytest
import torch

from helpers import assert_same_state, assert_user_error, run_script, save_vae_file, tiny_training_flags
from models.autoencoder import vae_models
from models.sit import SiT_models
from weights.checkpoint import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cached(ldm_run):
    """(data dir with images.h5 + e2e.h5, VAE file) of the session's pipeline (conftest.py)."""
    return ldm_run / "data", ldm_run / "pretrained" / "e2e" / "e2e.pt"


def train(cached, out, name, *extra, **overrides):
    """Run train_ldm_only.py with the tiny flags on the cached latents."""
    data, vae_path = cached
    flags = {"--vae-ckpt": vae_path, "--vae-latents-name": "e2e", **overrides}
    return run_script("train_ldm_only.py", *tiny_training_flags(data, out, name, **flags), *extra)


@pytest.fixture(scope="module")
def straight(ldm_run):
    """The pipeline's finished 6-step run: checkpoints at 3 and 6, logging every 4 steps."""
    return ldm_run / "ldm"


def test_ldm_only_trains_with_fixed_normalizer(cached, straight):
    ckpt = load_file(straight / "checkpoints" / "0000006.pt")
    assert {"model", "ema", "opt", "args", "steps"} <= ckpt.keys() and "vae" not in ckpt
    assert ckpt["steps"] == 6 and next(iter(ckpt["opt"]["state"].values()))["step"] == 6
    # The normalizer keeps the exported VAE's statistics: running_var = 1 / scale^2, running_mean = bias.
    stats = load_file(cached[1].with_name("e2e-latents-stats.pt"))
    for state in (ckpt["model"], ckpt["ema"]):
        torch.testing.assert_close(state["bn.running_var"], stats["latents_scale"].flatten() ** -2)
        torch.testing.assert_close(state["bn.running_mean"], stats["latents_bias"].flatten())
    SiT_models["SiT-P/2"](input_size=4, in_channels=4, num_classes=2, z_dims=[384],
                          encoder_depth=2).load_state_dict(ckpt["ema"], strict=True)
    assert sorted(p.name for p in (straight / "samples").iterdir()) == ["0000001.png", "0000003.png", "0000006.png"]


def test_checkpoint_lines_name_the_step_of_their_losses(straight):
    log = (straight / "log.txt").read_text()
    assert "0000003.pt at step 3; no losses logged yet" in log
    assert "0000006.pt at step 6; losses logged at step 4: sit_loss=" in log


def test_ldm_only_resume_is_exact(cached, straight, tmp_path):
    """Resumed and logging every step, the run ends where the straight run (logging every 4 steps) ends."""
    train(cached, tmp_path, "stopped", **{"--max-train-steps": 3, "--checkpointing-steps": 3, "--sampling-steps": 3})
    train(cached, tmp_path, "stopped", "--resume-latest", **{"--max-train-steps": 6, "--checkpointing-steps": 3,
                                                             "--sampling-steps": 3})
    reference = load_file(straight / "checkpoints" / "0000006.pt")
    again = load_file(tmp_path / "stopped" / "checkpoints" / "0000006.pt")
    for key in ("model", "ema", "opt", "rng", "data"):
        assert_same_state(reference[key], again[key], key)


def test_latents_cached_by_another_vae_are_refused_before_anything(cached, tmp_path):
    other = save_vae_file(tmp_path / "f16" / "f16.pt", vae_models["f16d32-tiny"](),
                          {"latents_scale": torch.ones(1, 32, 1, 1), "latents_bias": torch.zeros(1, 32, 1, 1)})
    data, _ = cached
    result = run_script("train_ldm_only.py", *tiny_training_flags(data, tmp_path, "other", **{
        "--vae": "f16d32-tiny", "--vae-ckpt": other, "--vae-latents-name": "e2e", "--model": "SiT-T/1"}),
        check=False)
    assert_user_error(result, "--vae-latents-name e2e: the latents cached in", "are 4x4x4",
                      "makes 32x2x2 latents")
    assert not (tmp_path / "other").exists()
