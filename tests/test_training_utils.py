"""Checkpoint I/O, the non-finite guard, EMA and the global batch-norm."""
import argparse
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from models.sit import SiT
from training.distributed import GlobalBatchNorm2d, convert_global_batchnorm
from training.ema import update_ema
from training.guard import NonFiniteGuard
from utils.errors import UserError
from weights.checkpoint import atomic_save, list_checkpoints, load_file, load_state_dict_strict, prune_checkpoints


def test_published_checkpoint_with_namespace_loads_weights_only(tmp_path):
    path = tmp_path / "0000010.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(model="SiT-XL/2"), "steps": 10}, path)
    loaded = load_file(path)
    assert loaded["args"].model == "SiT-XL/2" and loaded["steps"] == 10


def test_unsafe_pickles_are_refused_with_the_file_named(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": socket.AF_INET}, path)  # an arbitrary class, not allow-listed
    with pytest.raises(UserError, match="evil.pt"):
        load_file(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_file(tmp_path / "missing.pt")


def test_safetensors_files_load(tmp_path):
    save_file({"w": torch.arange(3.0)}, tmp_path / "w.safetensors")
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.arange(3.0))


def test_strict_load_error_names_file_keys_and_first_shape_mismatch():
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = module.state_dict()
    state["0.weight"] = torch.zeros(4, 2)
    state["extra"] = torch.zeros(1)
    del state["1.bias"]
    with pytest.raises(ValueError) as error:
        load_state_dict_strict(module, state, "ckpt/vae.pt")
    message = str(error.value)
    assert "ckpt/vae.pt" in message and "1.bias" in message and "extra" in message
    assert "0.weight: file has (4, 2), model expects (3, 2)" in message


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": torch.ones(1)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.equal(load_file(path)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_prune_keeps_newest(tmp_path):
    for step in (5, 10, 15):
        atomic_save({}, tmp_path / "checkpoints" / f"{step:07d}.pt")
    prune_checkpoints(tmp_path, 2)
    assert list_checkpoints(tmp_path) == [10, 15]


def test_guard_counts_on_the_device_and_stops_on_a_run():
    guard = NonFiniteGuard(max_consecutive=2)
    assert not guard.nonfinite("loss", torch.tensor(1.0), torch.tensor(2.0))
    guard.end_step()
    assert guard.nonfinite("loss", torch.tensor(float("nan")))
    guard.end_step()
    guard.nonfinite("loss", torch.tensor(0.5))  # a good step ends the run
    guard.end_step()
    guard.check(3)
    assert guard.skipped == 1 and guard.state_dict() == {"skipped": 1, "consecutive": 0}
    for _ in range(2):
        guard.nonfinite("grad", torch.tensor(1.0), torch.tensor(float("inf")))
        guard.end_step()
    guard.nonfinite("loss", torch.tensor(0.5))
    guard.end_step()  # the run of 2 ended before anyone looked: the check still sees it
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        guard.check(6)
    restored = NonFiniteGuard(max_consecutive=2)
    restored.load_state_dict({"skipped": 3, "consecutive": 1})
    restored.nonfinite("loss", torch.tensor(float("nan")))
    restored.end_step()
    with pytest.raises(RuntimeError, match="2 consecutive steps"):  # the run goes on across a resume
        restored.check(7)


def test_ema_averages_parameters_and_float_buffers():
    model = SiT(input_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=2, z_dims=[8], projector_dim=16,
                encoder_depth=1)
    ema = SiT(input_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=2, z_dims=[8], projector_dim=16,
              encoder_depth=1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        for p in ema.parameters():
            p.fill_(0.0)
        model.bn.running_mean.fill_(2.0)
        model.bn.num_batches_tracked.fill_(7)
    update_ema(ema, model, decay=0.75)
    assert all(torch.allclose(p, torch.full_like(p, 0.25)) for p in ema.parameters())
    assert torch.allclose(ema.bn.running_mean, torch.full((4,), 0.5))
    assert ema.bn.num_batches_tracked == 7


def _global_bn_worker(rank, world, port, x, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bn = convert_global_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3, affine=False, momentum=0.1)))[0]
    assert isinstance(bn, GlobalBatchNorm2d)
    local = x.chunk(world)[rank].clone().requires_grad_(True)
    out = bn(local)
    (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    result[rank] = (out.detach(), local.grad, bn.running_mean.clone(), bn.running_var.clone())
    dist.destroy_process_group()


def test_global_batchnorm_matches_batchnorm_on_the_whole_batch():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64).float()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_global_bn_worker, args=(2, port, x, result), nprocs=2)

    reference = torch.nn.BatchNorm2d(3, affine=False, momentum=0.1)
    whole = x.clone().requires_grad_(True)
    out = reference(whole)
    weights = torch.cat([torch.arange(out.numel() // 2).reshape(2, 3, 5, 5)] * 2)
    (out * weights).sum().backward()
    torch.testing.assert_close(torch.cat([result[0][0], result[1][0]]), out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([result[0][1], result[1][1]]), whole.grad, atol=1e-4, rtol=1e-4)
    for rank in (0, 1):
        torch.testing.assert_close(result[rank][2], reference.running_mean)
        torch.testing.assert_close(result[rank][3], reference.running_var)


def _unwrap_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    from training.step import unwrap
    plain = torch.nn.Linear(2, 2)
    for wrapped in (DistributedDataParallel(torch.compile(plain)), torch.compile(DistributedDataParallel(plain))):
        assert unwrap(wrapped) is plain
        assert list(unwrap(wrapped).state_dict()) == ["weight", "bias"]
    dist.destroy_process_group()


def test_unwrap_reaches_the_plain_module_behind_ddp_and_compile():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_unwrap_worker, args=(1, port), nprocs=1)
