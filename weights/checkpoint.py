"""Checkpoint I/O: weights-only loading, strict state-dict loading with clear errors, atomic saves."""
import argparse
import pickle
import re
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from utils.errors import UserError
from utils.files import TEMPORARY_NAME, atomic_write

# Training checkpoints store their argparse.Namespace under "args"; weights-only loading allows exactly that class.
CHECKPOINT_GLOBALS = [argparse.Namespace]
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format
PICKLE_MAGIC = b"\x80"  # torch.save's legacy format: a pickle (protocol 2+)
# How the error messages name what a module expects (by class name; models/ must not be imported here).
MODULE_KINDS = {"AutoencoderKL": "VAE", "NLayerDiscriminator": "discriminator", "VisionTransformer": "encoder"}
# What a weights mismatch asks to check when the caller names no flags.
MODEL_FLAGS = "the model flags (e.g. --model, --vae, --enc-type)"


def load_file(path, map_location="cpu", mmap=False):
    """Load a .pt/.pth (weights_only) or .safetensors file; an unreadable one raises UserError naming it.

    mmap=True maps the tensors of a torch zip file instead of reading them (a cheap readability check of a
    multi-GB file); it is ignored for .safetensors and legacy (pickle) files.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(folder_given_as_file(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    zipped = head == ZIP_MAGIC
    if not zipped and not head.startswith(PICKLE_MAGIC):
        raise UserError(f"{path} is not a PyTorch or safetensors checkpoint (neither a zip nor a pickle file): "
                        "pass a .pt/.pth file written by torch.save or a .safetensors file")
    if zipped and not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} is damaged or truncated (its zip directory is missing): "
                        "write it again, or pass another checkpoint")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as error:
        raise UserError(f"checkpoint {path} holds objects that weights-only loading refuses ({_reason(error)}): "
                        "pass a file of tensors (a state dict) or a checkpoint written by this project") from error
    except Exception as error:  # torch raises RuntimeError, KeyError, EOFError, ... for damaged files
        raise UserError(f"could not read checkpoint {path}: {_reason(error)}; "
                        "it is damaged, truncated or not a PyTorch checkpoint") from error


def folder_given_as_file(path):
    """The message for a folder given where a checkpoint file is read."""
    return f"{path} is a folder, not a checkpoint file: pass a .pt/.pth or .safetensors file"


def _load_safetensors(path, map_location):
    """safetensors' load_file; a damaged or foreign file raises UserError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors

    try:
        return load_safetensors(str(path), device=str(map_location))
    except SafetensorError as error:
        raise UserError(f"{path} is not a readable safetensors file ({_reason(error)}): pass a .safetensors file "
                        "written by safetensors, or a .pt/.pth file written by torch.save") from error


def _reason(error):
    """The informative part of a library's error message (torch's run over several lines)."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if refused:
        return refused[1]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def describe_mismatch(module, state_dict):
    """Return (missing, unexpected, first shape mismatch or None) of state_dict against module."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatch = next(
        ((k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
         if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)),
        None,
    )
    return missing, unexpected, mismatch


def _short(keys, limit=8):
    """Format a key list, eliding the tail."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(state_dict, source, kind="model"):
    """Raise UserError unless state_dict is a mapping of names to tensors; the message says what source holds."""
    if isinstance(state_dict, Mapping):
        odd = [k for k, v in state_dict.items() if not torch.is_tensor(v) and not str(k).endswith("_extra_state")]
        if not odd:
            return state_dict
        keys = _short([str(k) for k in state_dict])
        if "ema" in state_dict and "vae" in state_dict:
            fix = ": extract it with save_vae_weights.py" if kind in ("VAE", "discriminator") else ""
            raise UserError(f"{source} holds a REPA-E training checkpoint (keys {keys}), not a {kind} state dict{fix}")
        if "ema" in state_dict:
            raise UserError(f"{source} holds a training checkpoint (keys {keys}), not a {kind} state dict")
        raise UserError(f"{source} holds a dict whose entries {_short([str(k) for k in odd])} are no tensors "
                        f"(keys {keys}), not a {kind} state dict")
    raise UserError(f"{source} holds a {type(state_dict).__name__}, not a {kind} state dict")


def load_state_dict_strict(module, state_dict, source, flags=MODEL_FLAGS):
    """Load state_dict into module strictly; anything else raises UserError naming source and the differences.

    flags: what the message asks to check against the file (the flags that build module, e.g. "--vae").
    """
    name = type(module).__name__
    check_state_dict(state_dict, source, MODULE_KINDS.get(name, name))
    missing, unexpected, mismatch = describe_mismatch(module, state_dict)
    if missing or unexpected or mismatch:
        lines = [f"{source} does not fit {name}: check {flags} against the checkpoint"]
        if missing:
            lines.append(f"  missing keys: {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_short(unexpected)}")
        if mismatch:
            key, got, want = mismatch
            lines.append(f"  first shape mismatch: {key}: file has {got}, model expects {want}")
        raise UserError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)
    return module


def uninitialized(build, device, **kwargs):
    """build(**kwargs) on device without weight init (seconds for big models): a strict load fills every tensor."""
    with torch.device("meta"):
        module = build(**kwargs)
    return module.to_empty(device=device)


def atomic_save(obj, path):
    """torch.save through atomic_write: a crash never leaves a partial file."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def checkpoint_file(exp_dir, step):
    """Path of the checkpoint of a step: EXP/checkpoints/%07d.pt."""
    return Path(exp_dir) / "checkpoints" / f"{step:07d}.pt"


def list_checkpoints(exp_dir):
    """Steps of the complete checkpoints in EXP/checkpoints, ascending."""
    folder = Path(exp_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.stem) for p in folder.glob("*.pt") if p.stem.isdigit() and len(p.stem) == 7)


def newest_readable_checkpoint(exp_dir):
    """(newest checkpoint of EXP/checkpoints that loads, or None; [(path, reason)] of the newer ones that do not)."""
    unreadable = []
    for step in reversed(list_checkpoints(exp_dir)):
        path = checkpoint_file(exp_dir, step)
        try:
            load_file(path, mmap=True)  # maps the tensors: a damaged file fails, a big one costs no reading
        except (UserError, OSError) as error:
            unreadable.append((path, str(error)))
            continue
        return path, unreadable
    return None, unreadable


def remove_stale_temporaries(folder):
    """Remove what atomic_write leaves in folder when its process is killed mid-write (.NAME.XXXXXXXX.tmp).

    Call it only while no other process writes there: their temporaries have the same names. Returns the paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if not TEMPORARY_NAME.fullmatch(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


def prune_checkpoints(exp_dir, keep_last):
    """Delete all but the newest keep_last checkpoints (keep_last <= 0 keeps all)."""
    steps = list_checkpoints(exp_dir)
    if keep_last > 0:
        for step in steps[:-keep_last]:
            checkpoint_file(exp_dir, step).unlink(missing_ok=True)


def capture_rng_state():
    """Random state of this process (CPU and CUDA generators)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    """Restore what capture_rng_state returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteWeights(RuntimeError):
    """Weights that hold NaN or infinity: never written to a checkpoint."""


def assert_finite(state_dicts, what):
    """Raise NonFiniteWeights if any floating tensor of the named state dicts is not finite."""
    for name, state_dict in state_dicts.items():
        for key, value in state_dict.items():
            if torch.is_tensor(value) and torch.is_floating_point(value) and not torch.isfinite(value).all():
                raise NonFiniteWeights(f"refusing to write {what}: {name}.{key} holds non-finite values")
