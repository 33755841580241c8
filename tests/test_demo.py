"""The demo pipeline end to end (quick setting): every stage's outputs exist and are well formed."""
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from helpers import run_script
from utils.checkpoint import load_file

pytestmark = pytest.mark.slow


def test_demo_quick_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = run_script("demo.py", "--quick", "--out", out, timeout=900)
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items()}
    assert "Demo finished" in result.stdout and "train_repae:    step 6: sit_loss=" in result.stdout
    assert "randomly initialised" in result.stdout

    repae = load_file(summary["REPA-E checkpoint"])
    assert repae["steps"] == 6 and {"model", "ema", "vae", "discriminator"} <= repae.keys()
    ldm = load_file(summary["LDM-only checkpoint"])
    assert ldm["steps"] == 6 and "vae" not in ldm
    for grids in ("REPA-E sample grids", "LDM-only sample grids"):
        assert sorted(p.name for p in (out / summary[grids]).iterdir()) == ["0000001.png", "0000006.png"]

    vae_dir = out / summary["E2E-VAE (+ latent stats, discriminator)"]
    assert {p.name for p in vae_dir.iterdir()} >= {"e2e-demo.pt", "e2e-demo-latents-stats.pt",
                                                   "e2e-demo-discriminator-ckpt.pt", "diffusers"}
    from diffusers import AutoencoderKL
    assert AutoencoderKL.from_pretrained(summary["E2E-VAE as a diffusers folder"]).config.latent_channels == 4

    with h5py.File(summary["cached latents"]) as latents:
        assert latents["00000/img-mean-std-00000000.npy"].shape == (8, 4, 4)
    samples = np.load(summary["samples for FID (.npz)"])["arr_0"]
    assert samples.shape == (8, 32, 32, 3) and samples.dtype == np.uint8
    pngs = sorted((out / summary["generated PNGs"]).glob("*.png"))
    assert len(pngs) >= 8 and np.array_equal(np.asarray(Image.open(pngs[0])), samples[0])


def test_demo_never_replaces_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_script("demo.py", "--quick", "--out", tmp_path, check=False)
    assert result.returncode != 0 and "was not made by demo.py" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
