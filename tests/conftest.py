"""Shared test fixtures: parity fixture paths, single-threaded torch, offline hubs, and the tiny pipeline many tests
read (preprocessing -> train_repae -> save_vae_weights -> cache_latents -> train_ldm_only), built once per session."""
import os
import shutil

import pytest

from shared import shared_folder

# torch and the project load in the test processes, not here: pytest-xdist's controller imports this file too.

# torch.compile on a CPU first builds a 150 MB precompiled header into its cache (/tmp/torchinductor_USER); the few
# kernels the tests compile build as fast without it (75 s cold either way here), leaving 3 MB there, not 155 MB.
os.environ.setdefault("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", "0")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One torch thread per test process (pytest-xdist runs one process per core)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach the network: hub libraries run offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="module")
def sit_fix():
    """The SiT and sampler parity fixture (sit_tiny.pt)."""
    from helpers import load_fixture

    return load_fixture("sit_tiny.pt")


@pytest.fixture(scope="module")
def preprocess_fix():
    """The preprocessing parity fixture (preprocess.pt): ADM crops and encoder inputs."""
    from helpers import load_fixture

    return load_fixture("preprocess.pt")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 16-image, 2-class dataset at 32 px (images.h5 by preprocessing.py): 4 batches of 4 per epoch."""
    from helpers import make_dataset

    return shared_folder(tmp_path_factory, "tiny_data", make_dataset) / "data"


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A weights file of the FID Inception network with random (unit-scale) weights, written once per session in
    float16 (half the file; the network loads them as float32)."""

    def build(folder):
        import torch

        from evaluation.inception import InceptionV3

        torch.manual_seed(0)
        weights = {key: value.half() if value.is_floating_point() else value
                   for key, value in InceptionV3().state_dict().items()}
        torch.save(weights, folder / "random-inception.pth")

    return shared_folder(tmp_path_factory, "inception", build) / "random-inception.pth"


@pytest.fixture(scope="session")
def reference(tiny_data, tmp_path_factory, inception_weights):
    """(statistics file of tiny_data's first 8 images, the random Inception weights file it used), made once per
    session by reference_stats.py in batches of 4 with a random ViT-S for DINOv2, from an ADM batch of the images
    (adm.npz beside it)."""

    def build(folder):
        import numpy as np

        import reference_stats
        from evaluation import dinov2
        from evaluation.sources import H5Images

        np.savez(folder / "adm.npz", arr_0=next(H5Images(str(tiny_data)).batches(8)).numpy())
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dinov2, "DINOV2_ENCODER", "dinov2-vit-s")
            reference_stats.main([str(folder / "adm.npz"), str(folder / "ref.npz"), "--inception-weights",
                                  str(inception_weights), "--dinov2-random-init", "--batch-size", "4", "--device",
                                  "cpu", "--num-workers", "0"])

    return shared_folder(tmp_path_factory, "reference", build) / "ref.npz", inception_weights


@pytest.fixture(scope="session")
def repae_run(tmp_path_factory, tiny_data):
    """A finished 6-step train_repae.py run on tiny_data: checkpoints at 3 and 6, sample grids at 1, 3 and 6;
    returns its experiment folder (its console output in console.txt)."""
    from helpers import run_script, tiny_repae_flags

    def build(folder):
        result = run_script("train_repae.py", *tiny_repae_flags(
            tiny_data, folder, "base", **{"--max-train-steps": 6, "--checkpointing-steps": 3, "--sampling-steps": 3}))
        (folder / "base" / "console.txt").write_text(result.stderr)

    return shared_folder(tmp_path_factory, "repae_run", build) / "base"


@pytest.fixture(scope="session")
def ldm_run(tmp_path_factory, tiny_data, repae_run):
    """The rest of the pipeline after repae_run: its VAE exported by save_vae_weights.py (pretrained/e2e), the
    dataset's latents cached by cache_latents.py (data/e2e.h5) and a 6-step train_ldm_only.py run on them
    (checkpoints at 3 and 6, logging every 4 steps); returns the folder holding pretrained/, data/ and ldm/."""
    from helpers import TINY_VAE, run_script, tiny_training_flags

    def build(folder):
        run_script("save_vae_weights.py", "--repae-ckpt", repae_run / "checkpoints" / "0000006.pt",
                   "--vae-name", "e2e", "--save-dir", folder / "pretrained")
        shutil.copytree(tiny_data, folder / "data")
        vae = folder / "pretrained" / "e2e" / "e2e.pt"
        run_script("cache_latents.py", "--vae-arch", TINY_VAE, "--vae-ckpt-path", vae, "--vae-latents-name", "e2e",
                   "--data-dir", folder / "data", "--output-dir", folder / "data", "--pproc-batch-size", 8,
                   "--num-workers", 0)
        run_script("train_ldm_only.py", *tiny_training_flags(folder / "data", folder, "ldm", **{
            "--vae-ckpt": vae, "--vae-latents-name": "e2e", "--max-train-steps": 6, "--checkpointing-steps": 3,
            "--sampling-steps": 3, "--log-every": 4}))

    return shared_folder(tmp_path_factory, "ldm_run", build)
