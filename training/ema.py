"""Exponential moving average of a model's parameters and floating buffers."""
import copy

import torch


def make_ema(model):
    """A frozen, eval-mode copy of model to hold its moving average."""
    ema = copy.deepcopy(model).eval()
    requires_grad(ema, False)
    return ema


@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    """Step ema_model towards model; floating buffers (batch-norm statistics) are averaged, others copied."""
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.detach(), alpha=1 - decay)
    ema_buffers = dict(ema_model.named_buffers())
    for name, buffer in model.named_buffers():
        if torch.is_floating_point(buffer):
            ema_buffers[name].mul_(decay).add_(buffer.detach(), alpha=1 - decay)
        else:
            ema_buffers[name].copy_(buffer)


def requires_grad(params, flag=True):
    """Set requires_grad on a module's parameters, or on an iterable of parameters."""
    for param in params.parameters() if isinstance(params, torch.nn.Module) else params:
        param.requires_grad_(flag)
