"""Distributed helpers that also work with gloo on CPU."""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def is_distributed():
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
        stats = torch.cat([x.sum(dims), (x * x).sum(dims)]).to(torch.float64)
        stats = dist_fn.all_reduce(stats)
        count = dist_fn.all_reduce(count)
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
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), self.weight, self.bias, False, 0.0, self.eps)


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
