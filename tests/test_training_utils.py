"""The non-finite guard, the EMA, the global batch-norm and unwrapping prepared modules (checkpoint I/O:
test_checkpoint.py)."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_worker import global_batchnorm_worker
from helpers import tiny_sit
from training.ema import update_ema
from training.guard import NonFiniteGuard


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
    model, ema = tiny_sit(), tiny_sit()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        for p in ema.parameters():
            p.fill_(0.0)
        model.bn.running_mean.fill_(2.0)
        ema.bn.running_mean.zero_()
        model.bn.num_batches_tracked.fill_(7)
    update_ema(ema, model, decay=0.75)
    assert all(torch.allclose(p, torch.full_like(p, 0.25)) for p in ema.parameters())
    assert torch.allclose(ema.bn.running_mean, torch.full((4,), 0.5))
    assert ema.bn.num_batches_tracked == 7


@pytest.mark.slow
def test_global_batchnorm_matches_batchnorm_on_the_whole_batch():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64).float()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(global_batchnorm_worker, args=(2, port, x, result), nprocs=2)

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


def test_unwrap_reaches_the_plain_module_behind_ddp_and_compile(tmp_path):
    from torch.nn.parallel import DistributedDataParallel

    from training.step import unwrap

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        plain = torch.nn.Linear(2, 2)
        for wrapped in (DistributedDataParallel(torch.compile(plain)), torch.compile(DistributedDataParallel(plain))):
            assert unwrap(wrapped) is plain
            assert list(unwrap(wrapped).state_dict()) == ["weight", "bias"]
    finally:
        dist.destroy_process_group()
