"""The demo pipeline end to end (quick setting): every stage's outputs exist and are well formed."""
import json
import os
import re
import sys
import types
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from dataset.h5 import ImageDataset
from helpers import ROOT, TINY_VAE, run_main, run_script, use_cheap_frechet
from weights.checkpoint import load_file


def test_nearest_neighbour_check_counts_classes_by_their_majority():
    from demo import classes_recognised, nearest_training_images

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (8, 3))
    train_labels = np.repeat(np.arange(8), 3)
    train = np.broadcast_to(colours[train_labels, None, None], (24, 32, 32, 3)).astype(np.uint8)
    labels = np.repeat(np.arange(8), 5)
    samples = np.clip(colours[labels, None, None] + rng.normal(0, 5, (40, 32, 32, 3)), 0, 255).astype(np.uint8)
    samples[:3] = samples[5:8]  # three of class 0's five samples look like class 1
    samples[10:12] = samples[15:17]  # two of class 2's five samples look like class 3
    recognised = classes_recognised(labels, train_labels[nearest_training_images(samples, train)])
    assert recognised == {c: c != 0 for c in range(8)}


def stage_in_this_process(command, cwd, env, swap):
    """demo.run's subprocess.run for a single-process stage: the script's main(argv) called in this process, with
    the stage's environment and working folder (the quick pass starts no torchrun), each argument in swap replaced
    by its value."""
    python, script, *args = command
    assert python == sys.executable and script.endswith(".py"), command
    args = [swap.get(str(arg), arg) for arg in args]
    result = run_main(Path(script).name, args, env=env or dict(os.environ), cwd=cwd)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result


@pytest.mark.slow
def test_demo_quick_pipeline(tmp_path, monkeypatch):
    import demo

    # The stages run the test suite's networks in place of the demo's (27 MB written instead of 168 MB): SiT-P/2
    # for SiT-T/2, f8d4-pico for f8d4-tiny, and the demo's loss config with an 8-wide discriminator.
    narrow_config = OmegaConf.load(ROOT / "configs" / "demo_vae_loss.yaml")
    narrow_config.losses.discriminator_channels = 8
    OmegaConf.save(narrow_config, tmp_path / "demo_vae_loss_narrow.yaml")
    swap = {"SiT-T/2": "SiT-P/2", "f8d4-tiny": TINY_VAE,
            "configs/demo_vae_loss.yaml": str(tmp_path / "demo_vae_loss_narrow.yaml")}
    monkeypatch.setattr(demo, "subprocess", types.SimpleNamespace(run=partial(stage_in_this_process, swap=swap)))
    use_cheap_frechet(monkeypatch)
    out = tmp_path / "demo"
    result = run_script("demo.py", "--quick", "--out", out, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert "Demo finished" in result.stdout and "train_repae:    step 6: sit_loss=" in result.stdout
    assert "randomly initialised" in result.stdout and "a rerun replaces" in result.stdout
    for what, path in summary.items():
        assert what in result.stdout and (out / path).exists(), what

    repae = load_file(summary["REPA-E checkpoint"])
    recorded = json.loads((Path(summary["REPA-E checkpoint"]).parents[1] / "args.json").read_text())
    assert (recorded["model"], recorded["vae"]) == ("SiT-P/2", TINY_VAE)  # the swap took
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

    # the learning check: the figure printed beside the losses is the one its picture shows (a row per class: five
    # samples, then the nearest training image of each; a class counts when most of those are its own images)
    figure = re.search(r"nearest-neighbour check: (\d+)/8 classes", result.stdout)
    check = np.asarray(Image.open(summary["nearest-neighbour check (samples | nearest training images)"]))
    assert check.shape == (8 * 32, 2 * 5 * 32, 3)
    training = ImageDataset(str(out / "data"))
    label_of = {training[i][0].permute(1, 2, 0).numpy().tobytes(): int(training[i][1]) for i in range(len(training))}
    nearest_labels = [[label_of[check[32 * c:32 * (c + 1), 32 * k:32 * (k + 1)].tobytes()] for k in range(5, 10)]
                      for c in range(8)]
    assert figure and int(figure.group(1)) == sum(labels.count(c) > 2 for c, labels in enumerate(nearest_labels))

    # the FID column is the one train_ldm_only.py logged (one evaluation, at the end of the quick pass)
    evaluations = [json.loads(line) for line in (out / summary["LDM-only evaluations during training (.jsonl)"])
                   .read_text().splitlines()]
    assert [record["step"] for record in evaluations] == [6] and evaluations[0]["samples"] == 8
    column = re.findall(r"^    step +(\d+): ([\d.]+)$", result.stdout, flags=re.MULTILINE)
    assert column == [("6", f"{evaluations[0]['fid']:.2f}")]
    assert "FID of the LDM-only samples during training (random Inception weights: a smoke figure)" in result.stdout

    # the evaluation scripts are left out of the quick pass (their own tests run them)
    assert "evaluate.py, eval_vae.py and visualize_latents.py: skipped by --quick" in result.stdout
    assert not {"evaluate.py numbers (.json)", "eval_vae.py table (.json)", "visualize_latents.py picture"} & \
        summary.keys()


@pytest.mark.slow
def test_demo_never_replaces_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_script("demo.py", "--quick", "--out", tmp_path, check=False)
    assert result.returncode != 0 and "was not made by demo.py" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
