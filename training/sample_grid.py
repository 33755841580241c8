"""The in-training EMA sample grid: sampled, decoded, written as a PNG and sent to the trackers."""
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from sampling.samplers import euler_sampler
from training.distributed import all_gather_objects
from weights.latent_stats import denormalize_latents, stats_from_batchnorm


@torch.no_grad()
def sample_grid(ema, vae, accelerator, *, latent_shape, num_images, seed, path_type):
    """EMA samples of fixed labels and noise (Euler, 50 steps, CFG 4.0) decoded to [0, 1], from all processes."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(ema.num_classes, (num_images,), generator=generator)
    noise = torch.randn((num_images, *latent_shape), generator=generator)
    rank, world = accelerator.process_index, accelerator.num_processes
    local = slice(rank * num_images // world, (rank + 1) * num_images // world)
    was_training = vae.training
    vae.eval()
    samples = euler_sampler(ema, noise[local].to(accelerator.device), labels[local].to(accelerator.device),
                            num_steps=50, cfg_scale=4.0, guidance_low=0.0, guidance_high=1.0, path_type=path_type,
                            heun=False)
    stats = stats_from_batchnorm(ema.bn.running_mean, ema.bn.running_var)
    images = (vae.decode(denormalize_latents(samples.float(), stats)).float() + 1) / 2
    vae.train(was_training)
    return torch.cat(all_gather_objects(images.cpu()))


def array2grid(images):
    """(N,3,H,W) floats in [0,1] -> one uint8 HWC grid, square-ish as published."""
    nrow = round(math.sqrt(images.size(0)))
    grid = make_grid(images.clamp(0, 1), nrow=nrow, value_range=(0, 1))
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def save_sample_grid(accelerator, images, path, step):
    """Write the grid PNG at path and log it to every active tracker."""
    grid = array2grid(images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb
            tracker.log({"samples": wandb.Image(grid)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.ascontiguousarray(grid), step, dataformats="HWC")
    return path
