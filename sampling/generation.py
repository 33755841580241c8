"""The random stream of generate.py, shared by generate.py and the evaluation during training.

One process of generate.py seeds torch once, then for each batch draws its noise and labels, runs the sampler (the
SDE sampler draws more noise inside) and decodes. `sample_batches` yields those batches; a batch the caller skips is
still drawn, with a zero-velocity model, so that every later batch comes out the same.
"""
import math

import torch

from sampling import samplers


def process_seed(global_seed, rank, world_size):
    """The seed of process `rank` of world_size: REPA-E's sampling script's (SEED + rank) * WORLD_SIZE // 2."""
    return (global_seed + rank) * world_size // 2


def num_batches(num_images, batch_size):
    """Batches of batch_size it takes to sample num_images."""
    return math.ceil(num_images / batch_size)


class NullVelocity:
    """Zero-velocity stand-in: a sampler run with it draws the same random numbers as a real run, at no cost."""

    def __init__(self, num_classes):
        self.num_classes = num_classes

    def inference(self, x, t, y):
        return torch.zeros_like(x)


@torch.no_grad()
def sample_batches(model, decode, shape, *, seed, num_batches, batch_size, mode, num_steps, heun, cfg_scale,
                   guidance_low, guidance_high, path_type, skip=lambda batch: False):
    """Yield (batch index, decoded images) of one process's stream: torch seeded once with `seed`, then per batch
    noise of `shape` (C, h, w), labels, the Euler ODE (mode "ode") or Euler-Maruyama SDE sampler, and decode(float32
    latents) (weights.latent_stats.latent_decoder). Batches for which skip(index) is true are drawn but neither
    sampled nor decoded, and not yielded."""
    sampler = samplers.euler_maruyama_sampler if mode == "sde" else samplers.euler_sampler
    null_model = NullVelocity(model.num_classes)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    for batch in range(num_batches):
        z = torch.randn(batch_size, *shape, device=device)
        y = torch.randint(0, model.num_classes, (batch_size,), device=device)
        skipped = skip(batch)
        latents = sampler(model=null_model if skipped else model, latents=z, y=y, num_steps=num_steps, heun=heun,
                          cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high,
                          path_type=path_type)
        if skipped:
            continue
        yield batch, decode(latents.to(torch.float32))
