"""Checkpoint I/O: safe loading of published files, strict state-dict loading with clear errors, atomic saves."""
import argparse
import os
import tempfile
from pathlib import Path

import torch

# Published training checkpoints store their argparse.Namespace under "args"; allow exactly that class.
torch.serialization.add_safe_globals([argparse.Namespace])


def load_file(path, map_location="cpu"):
    """Load a .pt/.pth (weights_only) or .safetensors file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as load_safetensors
            return load_safetensors(str(path), device=str(map_location))
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
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def checkpoint_file(exp_dir, step):
    """Path of the published checkpoint name EXP/checkpoints/%07d.pt."""
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
