"""Atomic writes (permissions, nothing left behind on failure) and weights-only checkpoint loading."""
import argparse
import os
import stat

import pytest
import torch

from utils.checkpoint import atomic_save, load_file
from utils.files import atomic_write, current_umask


def mode(path):
    """Permission bits of a file or folder."""
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    """Run with umask 022 (files 0644), whatever the caller's, and restore it."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_saved_checkpoint_gets_umask_permissions(tmp_path, umask_022):
    path = atomic_save({"w": torch.ones(2)}, tmp_path / "checkpoints" / "0000001.pt")
    assert mode(path) == 0o644  # readable by collaborators, unlike mkstemp's private 0600
    os.umask(0o077)
    assert mode(atomic_save({}, tmp_path / "private.pt")) == 0o600
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
    assert [p.name for p in folder.iterdir()] == ["config.json"] and mode(folder) == 0o755
    with pytest.raises(ValueError), atomic_write(folder, folder=True) as tmp:
        (tmp / "config.json").write_text("half")
        raise ValueError("export failed")
    assert (folder / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers"]


def test_load_file_allows_namespace_without_changing_torch_globally(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"args": argparse.Namespace(model="SiT-XL/2"), "steps": 3}, path)
    assert load_file(path)["args"].model == "SiT-XL/2"
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_file(tmp_path / "missing.pt")
