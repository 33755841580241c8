"""Helpers for end-to-end tests: a tiny labelled image set, tiny training flags, running the scripts."""
import contextlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from fixtures.fill import fill_
from models.sit import SiT
from weights.latent_stats import set_batchnorm_stats

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


def run_script(script, *args, nproc=1, env=None, check=True, timeout=600, cwd=ROOT):
    """Run a project script (under torchrun with gloo when nproc > 1) in cwd; returns the CompletedProcess.
    env adds to the environment; a None value removes the variable."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "ACCELERATE_USE_CPU": "true", **(env or {})}
    full_env = {key: value for key, value in full_env.items() if value is not None}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run([*launcher, str(ROOT / script), *map(str, args)], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


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


def save_vae_file(path, vae, latents_stats):
    """Write a VAE checkpoint NAME.pt with NAME-latents-stats.pt beside it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vae.state_dict(), path)
    torch.save(latents_stats, path.with_name(path.stem + "-latents-stats.pt"))
    return path


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def make_photo_tree(root, photos=PHOTOS, classes=("n01", "n02")):
    """Lossless PNG photos from scikit-image spread round-robin over class folders; returns {path: array}."""
    arrays = {}
    for i, name in enumerate(photos):
        path = Path(root) / classes[i % len(classes)] / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays[path] = getattr(skimage.data, name)()
        Image.fromarray(arrays[path]).save(path)
    return arrays


def assert_close_rel(actual, expected, rtol=1e-8):
    """Same shape and dtype; max abs difference within rtol of the expected tensor's max magnitude."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual - expected).abs().max().item()
    assert err <= rtol * expected.abs().max().item(), f"max abs error {err:.3e}"


def fixture_sit(fix):
    """The parity fixture's tiny SiT (sit_tiny.pt) in float64 with fill_ weights and the fixture's normalizer."""
    config = dict(fix["config"])
    assert config.pop("decoder_hidden_size") == config["hidden_size"]  # our final layer always has the blocks' width
    model = fill_(SiT(**config).double())
    set_batchnorm_stats(model.bn, {"latents_scale": fix["latents_scale"], "latents_bias": fix["latents_bias"]})
    return model


def assert_user_error(result, *fragments):
    """A script refused bad input the way a person can read: no traceback, and a closing `error: ...` message
    (its first line, possibly followed by detail lines) that contains every fragment; returns the message."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-5000:]
    lines = result.stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert starts, result.stderr[-3000:]
    message = "\n".join(lines[starts[-1]:])
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"
    return message


def file_mode(path):
    """Permission bits of a file or folder."""
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def umask(value):
    """Run the block with the given umask (e.g. 0o022: files 0644, folders 0755), then restore the caller's."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)
