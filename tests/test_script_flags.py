"""The command lines of REPA-E's data, export, sampling and evaluation scripts: every flag, its type and default,
help for each, and a --help that answers at once (no heavy library imported) from any working folder."""
import argparse
import subprocess
import sys

import pytest

import cache_latents
import eval_vae
import evaluate
import generate
import preprocessing
import reference_stats
import save_vae_weights
import visualize_latents
from helpers import ROOT

SCRIPTS = (generate, cache_latents, preprocessing, save_vae_weights, evaluate, eval_vae, visualize_latents,
           reference_stats)
# Libraries that take from a tenth of a second (numpy) to several seconds (torch) to import.
HEAVY = {"torch", "torchvision", "diffusers", "timm", "h5py", "numpy", "PIL", "scipy", "accelerate",
         "huggingface_hub", "safetensors", "tqdm", "torch_fidelity", "torchmetrics"}

# flag -> (default, another value), from REPA-E's scripts; a boolean flag is passed as --flag / --no-flag.
FLAGS = {
    generate: {
        "--global-seed": (0, 3), "--tf32": (True, False), "--sample-dir": ("samples", "s"),
        "--exp-path": (None, "exps/x"), "--train-steps": (None, "400000"), "--pproc-batch-size": (256, 8),
        "--num-fid-samples": (50_000, 10), "--mode": ("ode", "ode"), "--cfg-scale": (1.5, 1.8),
        "--path-type": ("linear", "cosine"), "--num-steps": (50, 250), "--heun": (False, True),
        "--guidance-low": (0.0, 0.1), "--guidance-high": (1.0, 0.7),
    },
    cache_latents: {
        "--vae-arch": ("f16d32", "f8d4"),
        "--vae-ckpt-path": ("pretrained/repae-invae-400k/repae-invae-400k.pt", "v.pt"),
        "--vae-latents-name": ("repae-invae-400k", "e2e"), "--data-dir": ("data", "d"), "--output-dir": ("data", "o"),
        "--pproc-batch-size": (128, 16),
    },
    preprocessing: {
        "--output-path": ("data", "o"), "--resolution": (256, 512), "--num-workers": (16, 2),
        "--max-images": (None, 100),
    },
    save_vae_weights: {"--vae-name": ("e2e-vae", "v"), "--save-dir": ("exps", "d")},
}
REQUIRED = {preprocessing: ["--imagenet-path", "src"], save_vae_weights: ["--repae-ckpt", "c.pt"]}


def parsed(args, flags):
    """{flag: parsed value} of the named flags."""
    return {flag: getattr(args, flag[2:].replace("-", "_")) for flag in flags}


def argv_for(flag, value):
    """Command-line words that set flag to value."""
    if isinstance(value, bool):
        return [flag if value else f"--no-{flag[2:]}"]
    return [flag, str(value)]


@pytest.mark.parametrize("script", list(FLAGS), ids=lambda m: m.__name__)
def test_flags_defaults_and_values(script):
    required, flags = REQUIRED.get(script, []), FLAGS[script]
    defaults = script.build_parser().parse_args(required)
    assert parsed(defaults, flags) == {flag: default for flag, (default, _) in flags.items()}
    argv = required + [word for flag, (_, value) in flags.items() for word in argv_for(flag, value)]
    assert parsed(script.build_parser().parse_args(argv), flags) == {flag: value for flag, (_, value) in flags.items()}


@pytest.mark.parametrize("flags, message", [
    (["--mode", "sde", "--heun"], "--heun is only available with --mode ode"),
    (["--cfg-scale", "0.5"], "--cfg-scale must be >= 1.0"),
    (["--mode", "ddim"], "invalid choice: 'ddim'"),
    (["--num-steps", "0"], "0 is not a positive integer"),
])
def test_generate_rejects_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(flags)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_help_imports_nothing_heavy_from_any_folder(script, tmp_path):
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / f"{script.__name__}.py"), "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage:") and "(default:" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "utils.errors" in imported  # the timing lines were read
    assert not {name for name in imported if name.split(".")[0] in HEAVY}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_every_flag_has_help_and_shows_its_default(script):
    parser = script.build_parser()
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    undocumented = [action.dest for action in parser._actions
                    if not (action.help or "").strip() or action.help == argparse.SUPPRESS]
    assert undocumented == []
