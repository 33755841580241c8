"""Pieces of a training step that both trainers use: fused AdamW, the guarded update, and the wrappers around
trained modules (torch.compile, DDP, global batch-norm).
"""
import torch
from accelerate.utils import extract_model_from_parallel

from training.distributed import convert_global_batchnorm


def unwrap(module):
    """The plain module behind DDP and torch.compile wrappers, in either order (the module is not changed)."""
    module = extract_model_from_parallel(module, keep_fp32_wrapper=True)
    while hasattr(module, "_orig_mod"):
        module = module._orig_mod
    return module


def compile_modules(*modules):
    """torch.compile each module."""
    return [torch.compile(module) for module in modules]


def sync_batchnorm(model, accelerator):
    """Batch-norm statistics over the global batch when several processes train: SyncBatchNorm on CUDA,
    GlobalBatchNorm2d (same numbers) elsewhere, e.g. gloo on CPU."""
    if accelerator.num_processes == 1:
        return model
    if accelerator.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_global_batchnorm(model)


def make_adamw(params, *, lr, betas, weight_decay, eps):
    """Fused AdamW: one kernel per update, and it obeys the guard's device-side verdict (see guarded_update)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=True)


def guarded_update(accelerator, loss, parameters, optimizer, guard, name, max_grad_norm):
    """Backward; on an optimization step, clip and step unless the loss or gradient norm is non-finite.

    Returns the gradient norm (None while accumulating). The verdict stays on the device: the fused optimizer
    skips the whole update (weights, moments and step count) when its `found_inf` is set, the way torch's gradient
    scaler drives it; under fp16 the scaler sets it itself (and lowers its scale).
    """
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return None
    grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
    nonfinite = guard.nonfinite(name, loss, grad_norm)
    if accelerator.scaler is None:
        getattr(optimizer, "optimizer", optimizer).found_inf = nonfinite.float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
