"""Command-line flags both trainers read (published names, types and defaults), their checks, and the pieces other
scripts' parsers share.

Importing this module imports no torch, so that `--help` and flag errors answer at once.
"""
import argparse
from pathlib import Path

from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def repository_file(path, flag):
    """A resource path as given when it exists, else relative to the repository (so scripts run from any folder)."""
    given = Path(path)
    for candidate in (given, ROOT / given):
        if candidate.is_file():
            return candidate
    raise UserError(f"{flag} {path}: no such file (looked in {Path.cwd()} and {ROOT})")


def _bounded(kind, low, high, low_open=False, high_open=False, what=None):
    """An argparse type: `kind` values between low and high (None: unbounded), the ends included unless low_open /
    high_open; `what` names the range in errors and in --help."""
    def parse(text):
        value = kind(text)
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__, parse.range = what, what.removeprefix("a ").removeprefix("an ")
    return parse


positive_int = _bounded(int, 0, None, low_open=True, what="a positive integer (>= 1)")
non_negative_int = _bounded(int, 0, None, what="a non-negative integer (>= 0)")
positive_float = _bounded(float, 0.0, None, low_open=True, what="a positive number (> 0)")
non_negative_float = _bounded(float, 0.0, None, what="a non-negative number (>= 0)")
unit_float = _bounded(float, 0.0, 1.0, what="a number in [0, 1]")
below_one_float = _bounded(float, 0.0, 1.0, high_open=True, what="a number in [0, 1)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and the valid range of bounded flags, and keep the layout of a script's docstring."""

    def _get_help_string(self, action):
        help_text = super()._get_help_string(action)
        bounds = getattr(action.type, "range", None)
        return f"{help_text} [{bounds}]" if bounds else help_text


def vae_kind_help(ckpt_flag):
    """Help of the flag that names a VAE's kind (--vae, --vae-arch); ckpt_flag names its weights."""
    return ("VAE layout: f8d4, f16d32 (f8d4-tiny, f16d32-tiny, f8d4-pico: smoke-run sizes), or diffusers: any "
            f"diffusers AutoencoderKL folder or hub id given as {ckpt_flag}")


VAE_CKPT_HELP = ("NAME.pt (NAME-latents-stats.pt beside it), .safetensors, a diffusers AutoencoderKL folder, or a hub "
                 "id (REPA-E/e2e-vavae, hf://OWNER/NAME/FILE) fetched through the Hugging Face cache")
