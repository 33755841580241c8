"""Checkpoint I/O: weights-only loading, strict state-dict loading with clear errors, atomic saves."""
import argparse
from pathlib import Path

import torch

from utils.files import atomic_write

# Training checkpoints store their argparse.Namespace under "args"; weights-only loading allows exactly that class.
CHECKPOINT_GLOBALS = [argparse.Namespace]


def load_file(path, map_location="cpu"):
    """Load a .pt/.pth (weights_only) or .safetensors file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as load_safetensors
            return load_safetensors(str(path), device=str(map_location))
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise RuntimeError(f"could not read checkpoint {path}: {error}") from error


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


def load_state_dict_strict(module, state_dict, source):
    """Load state_dict into module strictly; on mismatch raise ValueError naming source and the differences."""
    missing, unexpected, mismatch = describe_mismatch(module, state_dict)
    if missing or unexpected or mismatch:
        lines = [f"{source} does not fit {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys: {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_short(unexpected)}")
        if mismatch:
            key, got, want = mismatch
            lines.append(f"  first shape mismatch: {key}: file has {got}, model expects {want}")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)
    return module


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


def assert_finite(state_dicts, what):
    """Raise if any floating tensor of the named state dicts is not finite (a checkpoint is never written so)."""
    for name, state_dict in state_dicts.items():
        for key, value in state_dict.items():
            if torch.is_tensor(value) and torch.is_floating_point(value) and not torch.isfinite(value).all():
                raise RuntimeError(f"refusing to write {what}: {name}.{key} holds non-finite values")
