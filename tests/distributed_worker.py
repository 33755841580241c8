"""A process of test_training_utils' 2-process batch-norm test, in a module of its own so that each spawned process
imports torch and the batch-norm only, not the test module's imports."""
import os

import torch
import torch.distributed as dist

from training.distributed import GlobalBatchNorm2d, convert_global_batchnorm


def global_batchnorm_worker(rank, world, port, x, result):
    """Rank `rank` of `world`: its share of x through a converted BatchNorm2d, forward and backward; puts (output,
    input gradient, running mean, running var) in result[rank]."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bn = convert_global_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3, affine=False, momentum=0.1)))[0]
    assert isinstance(bn, GlobalBatchNorm2d)
    local = x.chunk(world)[rank].clone().requires_grad_(True)
    out = bn(local)
    (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    result[rank] = (out.detach(), local.grad, bn.running_mean.clone(), bn.running_var.clone())
    dist.destroy_process_group()
