"""Distributed helpers that also work with gloo on CPU."""
import os

import torch
import torch.distributed as dist

from utils.errors import UserError


def launched_accelerator(**kwargs):
    """An accelerate Accelerator(**kwargs) that runs as every process the launcher started.

    Without a GPU, accelerate joins a torchrun process group only when told it runs on the CPU; otherwise each
    process would run as a 1-process job of its own, all into the same folders. A process count it still cannot
    join is refused.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise UserError(f"the launcher started {launched} processes but accelerate joined {accelerator.num_processes}: "
                        "on CPUs launch with torchrun --nproc_per_node N (gloo)")
    return accelerator


def is_distributed():
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of every process's input is the summed incoming gradient."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all processes.

    torch.nn.SyncBatchNorm does the same but only on CUDA; this one all-reduces sums (with autograd)
    so it runs on any backend, gloo included. State-dict keys are those of BatchNorm2d.
    """

    def forward(self, x):
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = (0, 2, 3)
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float64)
        dist.all_reduce(count)
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), (x * x).sum(dims)]).to(torch.float64))
        total_sum, total_sq = stats.chunk(2)
        mean = total_sum / count
        var = total_sq / count - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                unbiased = var * count / (count - 1)
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
                self.num_batches_tracked.add_(1)
        shape = (1, -1, 1, 1)
        out = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_global_batchnorm(module):
    """Replace every BatchNorm2d in module by a GlobalBatchNorm2d sharing its state."""
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                device=child.running_mean.device if child.running_mean is not None else None,
                dtype=child.running_mean.dtype if child.running_mean is not None else None,
            )
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            convert_global_batchnorm(child)
    return module


def all_gather_objects(obj):
    """List of obj from every process (a one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def from_main_process(obj):
    """obj as process 0 has it, on every process (obj itself when not distributed)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def on_main_process(fn):
    """fn() evaluated on process 0 only; its result, or the exception it raised, on every process."""
    outcome = None
    if not is_distributed() or dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as error:  # re-raised on every process below, so none waits forever
            outcome = (False, error)
    succeeded, value = from_main_process(outcome)
    if not succeeded:
        raise value
    return value
