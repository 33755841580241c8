"""Helpers shared by the tests: parity fixtures, tiny data and models, training flags, running the scripts (in this
process or in their own), state comparisons."""
import contextlib
import gc
import importlib
import io
import os
import stat
import sys
import traceback
import warnings
from pathlib import Path
from subprocess import CompletedProcess
from subprocess import run as subprocess_run

import numpy as np
import skimage.data
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from fixtures.fill import fill_
from models.sit import SiT
from utils.errors import report_user_errors
from weights.latent_stats import set_batchnorm_stats

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
TINY_LOSS_CONFIG = FIXTURES / "tiny_vae_loss.yaml"
TINY_VAE = "f8d4-pico"  # the test runs' VAE: a third of f8d4-tiny's weights


def load_fixture(name):
    """Load a parity fixture from tests/fixtures (weights_only)."""
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


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
    """Flags either trainer takes for a seconds-long CPU run: SiT-P/2, f8d4-pico VAE, random encoder, 32 px."""
    flags = {
        "--exp-name": exp_name, "--output-dir": output_dir, "--data-dir": data_dir, "--resolution": 32,
        "--model": "SiT-P/2", "--vae": TINY_VAE, "--vae-ckpt": "none", "--enc-type": "dinov2-vit-s",
        "--batch-size": 4, "--max-train-steps": 4, "--checkpointing-steps": 2, "--sampling-steps": 1000,
        "--sample-batch-size": 4, "--num-classes": 2, "--encoder-depth": 2, "--report-to": "none",
        "--mixed-precision": "no", "--num-workers": 0, "--seed": 0,
    }
    flags.update(overrides)
    args = [str(a) for kv in flags.items() if kv[1] is not None for a in kv]
    return args + ["--no-compile", "--enc-random-init"]


def tiny_repae_flags(data_dir, output_dir, exp_name, **overrides):
    """tiny_training_flags for train_repae.py: with an 8-wide discriminator and a random LPIPS trunk."""
    flags = tiny_training_flags(data_dir, output_dir, exp_name, **{"--loss-cfg-path": TINY_LOSS_CONFIG, **overrides})
    return flags + ["--lpips-random-init"]


def run_script(script, *args, nproc=1, env=None, check=True, timeout=600, cwd=ROOT, subprocess=False):
    """Run a project script's main(argv) in this process, or in a new Python process (under torchrun with gloo when
    nproc > 1) when the process is what a test is about; returns a CompletedProcess with its output.
    env adds to the environment; a None value removes the variable."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "ACCELERATE_USE_CPU": "true", **(env or {})}
    full_env = {key: value for key, value in full_env.items() if value is not None}
    args = [str(arg) for arg in args]
    if subprocess or nproc > 1:
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        result = subprocess_run([*launcher, str(ROOT / script), *args], cwd=cwd, env=full_env,
                                capture_output=True, text=True, timeout=timeout)
    else:
        result = run_main(script, args, env=full_env, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run_main(script, args, *, env, cwd):
    """Call `script`'s main(args) as its process would: the given environment and working folder, warnings printed,
    user errors reported as one line and exit status 1, a fresh accelerate state; returns a CompletedProcess."""
    module = importlib.import_module(Path(script).stem)
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    with (contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), environment(env),
          contextlib.chdir(cwd), script_warnings(), fresh_accelerate_state()):
        sys.argv = [script, *args]
        try:
            report_user_errors(module.main)(args)
        except SystemExit as exit:
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
            returncode = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except Exception:
            traceback.print_exc()
            returncode = 1
    return CompletedProcess([script, *args], returncode, stdout.getvalue(), stderr.getvalue())


@contextlib.contextmanager
def environment(env):
    """Run the block with exactly these environment variables and sys.argv, then restore the caller's."""
    saved, saved_argv = dict(os.environ), sys.argv
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sys.argv = saved_argv


@contextlib.contextmanager
def script_warnings():
    """Warnings printed to stderr every time, as a script's process shows them (pytest otherwise collects them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for category in (DeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        yield


@contextlib.contextmanager
def fresh_accelerate_state():
    """accelerate keeps one state per process: each in-process run starts from an empty one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        yield
    finally:
        gc.collect()


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


def cheap_frechet(mu1, sigma1, mu2, sigma2):
    """A stand-in for the Frechet distance that depends on every value of both statistics. A few samples' Frechet
    distance takes the ADM evaluator's singular-covariance path, whose 2048x2048 square roots take half a minute each
    here; the formula itself is tested against the ADM evaluator in test_evaluate.py."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(np.abs(sigma1 - sigma2)))


def use_cheap_frechet(monkeypatch):
    """cheap_frechet in place of the Frechet distance, in this process, wherever it is called from."""
    from evaluation import features, metrics
    from training import evaluator

    for module in (metrics, features, evaluator):  # where it is defined, and where it was imported from there
        monkeypatch.setattr(module, "frechet_distance", cheap_frechet)


def randomize_vit_(model):
    """Random weights for a timm ViT such that every weight shows in its features, and small on disk: layer scales
    U(0.5, 1), prefix tokens and positions N(0, 0.5), each its own tensor; every other weight a view of one shared
    N(0, 0.02) storage at its own offset (no two are equal), which torch.save writes once (a ViT-S file of about
    4 MB instead of 88 MB)."""
    torch.manual_seed(0)
    params = list(model.parameters())
    storage = torch.randn(max(param.numel() for param in params) + len(params)) * 0.02
    for offset, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("gamma"):
            param.data = torch.empty_like(param).uniform_(0.5, 1.0)
        elif name in ("cls_token", "reg_token", "pos_embed"):
            param.data = torch.empty_like(param).normal_(0, 0.5)
        else:
            param.data = storage[offset:offset + param.numel()].view_as(param)
    return model


def tiny_sit(**overrides):
    """A 2-block, 32-wide SiT-like model for 4x4 latents with deterministic non-trivial weights (fill_), in eval
    mode; keyword arguments override its SiT settings."""
    config = dict(input_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10, z_dims=[16],
                  projector_dim=32, encoder_depth=1)
    return fill_(SiT(**{**config, **overrides})).eval()


def training_checkpoint(sit, vae=None, *, steps, args=None, **entries):
    """A training checkpoint in the published layout: the SiT's weights as model and ema, the VAE's when given (a
    REPA-E checkpoint), steps, args when given, and any other entries."""
    checkpoint = {"model": sit.state_dict(), "ema": sit.state_dict(), "steps": steps, **entries}
    if vae is not None:
        checkpoint["vae"] = vae.state_dict()
    if args is not None:
        checkpoint["args"] = args
    return checkpoint


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
