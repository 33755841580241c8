"""Helpers for end-to-end tests: a tiny labelled image set, tiny training flags, running the scripts."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_image_tree(folder, classes=2, per_class=8, size=(40, 48), seed=0):
    """Write class folders of random PNG images; returns the folder."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (Path(folder) / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(Path(folder) / f"class{c}" / f"{i}.png")
    return Path(folder)


def make_dataset(tmp_path, resolution=32, **tree_kwargs):
    """images.h5 of a random labelled image tree, made by preprocessing.py; returns the data folder."""
    source = make_image_tree(tmp_path / "source", **tree_kwargs)
    data = tmp_path / "data"
    run_script("preprocessing.py", "--imagenet-path", source, "--output-path", data,
               "--resolution", resolution, "--num-workers", 1)
    return data


def tiny_training_flags(data_dir, output_dir, exp_name, **overrides):
    """Flags of a seconds-long CPU run: SiT-T/2, tiny f8d4 VAE, random encoder and LPIPS trunk, 32 px."""
    flags = {
        "--exp-name": exp_name, "--output-dir": output_dir, "--data-dir": data_dir, "--resolution": 32,
        "--model": "SiT-T/2", "--vae": "f8d4-tiny", "--vae-ckpt": "none", "--enc-type": "dinov2-vit-s",
        "--batch-size": 4, "--max-train-steps": 4, "--checkpointing-steps": 2, "--sampling-steps": 1000,
        "--sample-batch-size": 4, "--num-classes": 2, "--encoder-depth": 2, "--report-to": "none",
        "--mixed-precision": "no", "--num-workers": 0, "--seed": 0,
    }
    flags.update(overrides)
    args = [str(a) for kv in flags.items() if kv[1] is not None for a in kv]
    return args + ["--no-compile", "--enc-random-init"]


def run_script(script, *args, nproc=1, env=None, check=True, timeout=600):
    """Run a project script (under torchrun with gloo when nproc > 1); returns the CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "ACCELERATE_USE_CPU": "true", **(env or {})}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run([*launcher, str(ROOT / script), *map(str, args)], cwd=ROOT, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result
