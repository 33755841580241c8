"""Checkpoint I/O: atomic writes (permissions, nothing left behind on failure), weights-only loading with one-line
errors, strict loading that names what does not fit, finding and pruning checkpoints."""
import argparse
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from helpers import ROOT, file_mode, umask
from loss.discriminator import NLayerDiscriminator
from models.autoencoder import vae_models
from utils.errors import UserError
from utils.files import atomic_write, current_umask
from weights.checkpoint import (
    atomic_save,
    checkpoint_file,
    list_checkpoints,
    load_file,
    load_state_dict_strict,
    newest_readable_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
)


@pytest.fixture
def umask_022():
    """Run with umask 022 (files 0644), whatever the caller's."""
    with umask(0o022):
        yield


def test_saved_checkpoint_gets_umask_permissions(tmp_path, umask_022):
    path = atomic_save({"w": torch.ones(2)}, tmp_path / "checkpoints" / "0000001.pt")
    assert file_mode(path) == 0o644  # readable by collaborators, unlike mkstemp's private 0600
    os.umask(0o077)
    assert file_mode(atomic_save({}, tmp_path / "private.pt")) == 0o600
    assert current_umask() == 0o077


def test_failing_write_leaves_neither_target_nor_temporary(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"a": Unpicklable()}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failing_write_keeps_the_old_file(tmp_path):
    path = atomic_save({"a": torch.ones(1)}, tmp_path / "ckpt.pt")
    with pytest.raises(OSError), atomic_write(path) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")
    assert torch.equal(load_file(path)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_folder_replaces_the_old_one_at_once(tmp_path, umask_022):
    folder = tmp_path / "diffusers"
    folder.mkdir()
    (folder / "stale.json").write_text("old")
    with atomic_write(folder, folder=True) as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir() and not (tmp / "stale.json").exists()
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers"]
    assert [p.name for p in folder.iterdir()] == ["config.json"] and file_mode(folder) == 0o755
    with pytest.raises(ValueError), atomic_write(folder, folder=True) as tmp:
        (tmp / "config.json").write_text("half")
        raise ValueError("export failed")
    assert (folder / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers"]


def test_load_file_allows_namespace_without_changing_torch_globally(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"args": argparse.Namespace(model="SiT-XL/2"), "steps": 3}, path)  # as published checkpoints hold
    loaded = load_file(path)
    assert loaded["args"].model == "SiT-XL/2" and loaded["steps"] == 3
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_file(tmp_path / "missing.pt")


def cut_short(path):
    """Truncate a file to half its size, as a killed copy or a full disk leaves it."""
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2])
    return path


def test_unreadable_files_raise_one_clear_user_error(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("loss went down\n")
    with pytest.raises(UserError) as error:
        load_file(text)
    assert str(error.value) == (f"{text} is not a PyTorch or safetensors checkpoint (neither a zip nor a pickle "
                                "file): pass a .pt/.pth file written by torch.save or a .safetensors file")
    truncated = cut_short(atomic_save({"w": torch.ones(1000)}, tmp_path / "truncated.pt"))
    with pytest.raises(UserError, match=f"checkpoint {truncated} is damaged or truncated"):
        load_file(truncated)
    fake = tmp_path / "text.safetensors"
    fake.write_text("not tensors")
    with pytest.raises(UserError, match=f"{fake} is not a readable safetensors file"):
        load_file(fake)
    numpy_file = tmp_path / "numpy.pt"
    torch.save({"w": torch.ones(2).numpy()}, numpy_file)
    with pytest.raises(UserError, match=f"checkpoint {numpy_file} holds objects that weights-only loading refuses "
                                        r"\(numpy\..*_reconstruct\): pass a file of tensors"):
        load_file(numpy_file)
    for error_file in (text, truncated, fake, numpy_file):
        with pytest.raises(UserError) as error:
            load_file(error_file)
        assert "\n" not in str(error.value)


def test_load_file_maps_zip_files_and_reads_the_others(tmp_path):
    weights = {"w": torch.arange(6.0).view(2, 3)}
    zipped, legacy, tensors = tmp_path / "zip.pt", tmp_path / "legacy.pt", tmp_path / "w.safetensors"
    torch.save(weights, zipped)
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    save_file(weights, tensors)
    for path in (zipped, legacy, tensors):
        assert torch.equal(load_file(path, mmap=True)["w"], weights["w"]), path
    assert torch.equal(load_file(zipped, mmap=True)["w"], load_file(zipped)["w"])


def test_state_dict_checks_say_what_the_file_holds(tmp_path):
    linear = torch.nn.Linear(2, 3)
    with pytest.raises(UserError, match=r"^x\.pt holds a Tensor, not a Linear state dict$"):
        load_state_dict_strict(linear, torch.ones(2), "x.pt")
    with pytest.raises(UserError, match=r"^x\.pt holds a list, not a Linear state dict$"):
        load_state_dict_strict(linear, [torch.ones(2)], "x.pt")
    training = {"model": {}, "ema": {}, "vae": {}, "discriminator": {}, "opt": {}, "args": None, "steps": 1}
    with pytest.raises(UserError) as error:
        load_state_dict_strict(torch.nn.Module(), training, "EXP/checkpoints/0000001.pt")
    assert str(error.value) == ("EXP/checkpoints/0000001.pt holds a REPA-E training checkpoint (keys model, ema, vae, "
                                "discriminator, opt, args, steps), not a Module state dict")
    with pytest.raises(UserError, match=r"not a VAE state dict: extract it with save_vae_weights\.py$"):
        load_state_dict_strict(vae_models["f8d4-tiny"](), training, "ckpt.pt")
    with pytest.raises(UserError, match=r"not a discriminator state dict: extract it with save_vae_weights\.py$"):
        load_state_dict_strict(NLayerDiscriminator(), training, "ckpt.pt")
    with pytest.raises(UserError, match=r"^ldm\.pt holds a training checkpoint \(keys model, ema\), not a Linear"):
        load_state_dict_strict(linear, {"model": {}, "ema": {}}, "ldm.pt")
    with pytest.raises(UserError, match=r"^x\.pt holds a dict whose entries epoch are no tensors"):
        load_state_dict_strict(linear, {"weight": torch.ones(3, 2), "epoch": 3}, "x.pt")


def test_strict_mismatch_names_file_module_and_flags(tmp_path):
    linear = torch.nn.Linear(2, 3)
    state = {"weight": torch.ones(3, 4), "extra": torch.ones(1)}
    with pytest.raises(UserError) as error:
        load_state_dict_strict(linear, state, "small.pt")
    first, *details = str(error.value).splitlines()
    assert first == "small.pt does not fit Linear: check the model flags (e.g. --model, --vae, --enc-type) against " \
                    "the checkpoint"
    assert details == ["  missing keys: bias", "  unexpected keys: extra",
                       "  first shape mismatch: weight: file has (3, 4), model expects (3, 2)"]
    fitting = {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}
    assert torch.equal(load_state_dict_strict(linear, fitting, "ok.pt").weight, fitting["weight"])


def test_strict_mismatch_names_the_flags_its_caller_gives():
    with pytest.raises(UserError) as error:
        load_state_dict_strict(torch.nn.Linear(2, 3), {"weight": torch.ones(3, 4)}, "small.pt", flags="--vae")
    assert str(error.value).splitlines()[0] == "small.pt does not fit Linear: check --vae against the checkpoint"


def test_folder_given_as_checkpoint_file_is_named_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError) as error:
        load_file(tmp_path)
    assert str(error.value) == (f"{tmp_path} is a folder, not a checkpoint file: pass a .pt/.pth or .safetensors "
                                "file")
    with pytest.raises(FileNotFoundError, match=f"^checkpoint file not found: {tmp_path / 'nothere.pt'}$"):
        load_file(tmp_path / "nothere.pt")


def test_newest_readable_checkpoint_skips_damaged_newer_ones(tmp_path):
    assert newest_readable_checkpoint(tmp_path) == (None, [])
    for step in (1, 2, 3, 4):
        atomic_save({"steps": step, "w": torch.full((100,), float(step))}, checkpoint_file(tmp_path, step))
    cut_short(checkpoint_file(tmp_path, 4))
    checkpoint_file(tmp_path, 3).write_bytes(b"")
    path, unreadable = newest_readable_checkpoint(tmp_path)
    assert path == checkpoint_file(tmp_path, 2) and load_file(path)["steps"] == 2
    assert [p for p, _ in unreadable] == [checkpoint_file(tmp_path, 4), checkpoint_file(tmp_path, 3)]
    assert "damaged or truncated" in unreadable[0][1] and "not a PyTorch" in unreadable[1][1]
    for step in (1, 2):
        checkpoint_file(tmp_path, step).write_text("gone")
    path, unreadable = newest_readable_checkpoint(tmp_path)
    assert path is None and len(unreadable) == 4


def test_remove_stale_temporaries_takes_only_what_atomic_write_leaves(tmp_path):
    # a process killed inside atomic_write, as a kill -9 or a lost node leaves its temporaries behind
    code = ("import os, sys; from utils.files import atomic_write\n"
            "with atomic_write(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half'); os._exit(9)\n")
    for target in ("0000002.pt", "e2e-vae.pt"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / target)], cwd=ROOT, check=False)
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "kept", folder=True):
        raise KeyboardInterrupt  # a clean failure removes its own temporary
    killed = sorted(tmp_path.iterdir())
    assert len(killed) == 2 and all(p.name.startswith((".0000002.pt.", ".e2e-vae.pt.")) for p in killed)
    stale_folder = tmp_path / ".diffusers.k2j3h4.tmp"
    (stale_folder / "sub").mkdir(parents=True)
    keep = [".hidden", "0000001.pt", ".x.tmp", "notes.tmp", ".notes.Draft.tmp", ".run.abcdefgh.tmp.bak"]
    for name in keep:
        (tmp_path / name).write_text("keep")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([*killed, stale_folder])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_unsafe_pickles_are_refused_with_the_file_named(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": socket.AF_INET}, path)  # an arbitrary class, not allow-listed
    with pytest.raises(UserError, match="evil.pt"):
        load_file(path)


def test_prune_keeps_newest(tmp_path):
    for step in (5, 10, 15):
        atomic_save({}, tmp_path / "checkpoints" / f"{step:07d}.pt")
    prune_checkpoints(tmp_path, 2)
    assert list_checkpoints(tmp_path) == [10, 15]
