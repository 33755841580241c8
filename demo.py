"""The whole REPA-E pipeline on a tiny setting that runs on a CPU in about ten minutes, without downloads.

Data: crops of eight colour photographs that ship with scikit-image, one class per photograph. No pretrained
weights are available offline, so the DINOv2 encoder and the LPIPS VGG trunk are randomly initialised (the
losses still train; the samples show the machinery, not image quality). Each stage runs the real script:

    preprocessing.py -> train_repae.py -> save_vae_weights.py (+ diffusers export) -> cache_latents.py
    -> train_ldm_only.py -> generate.py (torchrun, 2 processes) -> NAME.npz

    python demo.py                 # about ten minutes on 2 cores
    python demo.py --quick         # a one-minute pass with fewer images and steps (used by the tests)
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel")
MARKER = ".repae-demo"  # marks a folder demo.py made, so that only such a folder is ever replaced
SETTINGS = {
    "full": dict(resolution=64, crops=12, batch=8, repae_steps=240, ldm_steps=400, samples=32, sampling_steps=25),
    "quick": dict(resolution=32, crops=4, batch=8, repae_steps=6, ldm_steps=6, samples=8, sampling_steps=4),
}


def make_photo_tree(folder, crops_per_photo, seed=0):
    """Random square crops (and flips) of the scikit-image photographs, one class folder per photograph."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for label, name in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()[..., :3]
        class_dir = Path(folder) / f"{label:02d}_{name}"
        class_dir.mkdir(parents=True, exist_ok=True)
        height, width = photo.shape[:2]
        for i in range(crops_per_photo):
            side = int(min(height, width) * rng.uniform(0.6, 1.0))
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            crop = photo[top:top + side, left:left + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).save(class_dir / f"{i:03d}.png")
    return Path(folder)


def run(step, *args, nproc=1):
    """Run one pipeline stage as its real command line, echoing it; stop the demo if it fails."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*launcher, *map(str, args)]
    print(f"\n=== {step}\n$ {' '.join(command)}", flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"demo stopped: {step} failed with exit code {result.returncode}")
    print(f"=== {step}: done in {time.time() - started:.0f} s", flush=True)


def last_losses(log_file):
    """The loss line of the last step logged in an experiment's log.txt."""
    found = re.findall(r"step \d+: .*", Path(log_file).read_text())
    return found[-1] if found else "(no losses logged)"


def main(argv=None):
    """Run every stage and print where the outputs are."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out", help="folder for every output")
    parser.add_argument("--quick", action="store_true", help="a short pass (fewer images, steps and samples)")
    args = parser.parse_args(argv)
    cfg = SETTINGS["quick" if args.quick else "full"]
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            sys.exit(f"{out} exists and was not made by demo.py: choose another --out")
        shutil.rmtree(out)  # a previous demo's outputs: the demo always starts from scratch
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    data, exps, pretrained, samples = out / "data", out / "exps", out / "pretrained", out / "samples"
    started = time.time()
    print("No pretrained weights are available offline: the encoder (dinov2-vit-s) and the LPIPS VGG trunk are "
          "randomly initialised, and the VAE starts from random weights.")

    make_photo_tree(out / "photos", cfg["crops"])
    run("preprocessing", "preprocessing.py", "--imagenet-path", out / "photos", "--output-path", data,
        "--resolution", cfg["resolution"], "--num-workers", 2)

    common = ["--resolution", cfg["resolution"], "--model", "SiT-T/2", "--vae", "f8d4-tiny",
              "--enc-type", "dinov2-vit-s", "--enc-random-init", "--encoder-depth", 2, "--num-classes", len(PHOTOS),
              "--batch-size", cfg["batch"], "--report-to", "none", "--mixed-precision", "no", "--no-compile",
              "--num-workers", 0, "--sample-batch-size", 16, "--ema-decay", 0.99, "--output-dir", exps,
              "--data-dir", data]
    repae_steps = cfg["repae_steps"]
    run("train_repae (end-to-end SiT + VAE)", "train_repae.py", "--exp-name", "repae-demo", *common,
        "--vae-ckpt", "none", "--lpips-random-init", "--max-train-steps", repae_steps,
        "--checkpointing-steps", repae_steps, "--sampling-steps", repae_steps)
    repae_ckpt = exps / "repae-demo" / "checkpoints" / f"{repae_steps:07d}.pt"

    run("save_vae_weights (E2E-VAE + diffusers export)", "save_vae_weights.py", "--repae-ckpt", repae_ckpt,
        "--vae-name", "e2e-demo", "--save-dir", pretrained, "--diffusers")
    vae_ckpt = pretrained / "e2e-demo" / "e2e-demo.pt"

    run("cache_latents (frozen E2E-VAE)", "cache_latents.py", "--vae-arch", "f8d4-tiny", "--vae-ckpt-path", vae_ckpt,
        "--vae-latents-name", "e2e-demo", "--data-dir", data, "--output-dir", data, "--pproc-batch-size", 16,
        "--num-workers", 0)

    ldm_steps = cfg["ldm_steps"]
    run("train_ldm_only (SiT + REPA on cached latents)", "train_ldm_only.py", "--exp-name", "ldm-demo", *common,
        "--vae-ckpt", vae_ckpt, "--vae-latents-name", "e2e-demo", "--max-train-steps", ldm_steps,
        "--checkpointing-steps", ldm_steps, "--sampling-steps", ldm_steps)

    run("generate (2 processes, gloo)", "generate.py", "--exp-path", exps / "ldm-demo", "--train-steps", ldm_steps,
        "--sample-dir", samples, "--num-fid-samples", cfg["samples"], "--pproc-batch-size", 8,
        "--num-steps", cfg["sampling_steps"], "--cfg-scale", 1.5, nproc=2)
    npz = next(samples.glob("*.npz"))

    summary = {
        "REPA-E checkpoint": repae_ckpt,
        "REPA-E sample grids": exps / "repae-demo" / "samples",
        "E2E-VAE (+ latent stats, discriminator)": vae_ckpt.parent,
        "E2E-VAE as a diffusers folder": vae_ckpt.parent / "diffusers",
        "cached latents": data / "e2e-demo.h5",
        "LDM-only checkpoint": exps / "ldm-demo" / "checkpoints" / f"{ldm_steps:07d}.pt",
        "LDM-only sample grids": exps / "ldm-demo" / "samples",
        "generated PNGs": npz.with_suffix(""),
        "samples for FID (.npz)": npz,
    }
    print(f"\nDemo finished in {time.time() - started:.0f} s. Outputs:")
    for what, path in summary.items():
        print(f"  {what:42s} {path}")
    print("Losses reached:")
    print(f"  train_repae:    {last_losses(exps / 'repae-demo' / 'log.txt')}")
    print(f"  train_ldm_only: {last_losses(exps / 'ldm-demo' / 'log.txt')}")
    (out / "summary.json").write_text(json.dumps({k: str(v) for k, v in summary.items()}, indent=2))


if __name__ == "__main__":
    main()
