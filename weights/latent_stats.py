"""Latent statistics, in every form they are stored, and their use.

One form in memory: {"latents_scale": (1,C,1,1), "latents_bias": (1,C,1,1)} (the NAME-latents-stats.pt file format);
a latent z is normalized as (z - bias) * scale. Every conversion from or to another form (a batch-norm's running
statistics, a diffusers config) is here.
"""
from pathlib import Path

import torch

from models.autoencoder import preprocess_imgs_vae, to_uint8_hwc
from utils.errors import UserError
from weights.hub import STATS_SUFFIX


def stats_from_batchnorm(running_mean, running_var):
    """Statistics of a batch-norm that normalizes latents: scale = running_var^-1/2, bias = running_mean."""
    channels = running_mean.numel()
    return {"latents_scale": running_var.detach().rsqrt().view(1, channels, 1, 1),
            "latents_bias": running_mean.detach().clone().view(1, channels, 1, 1)}


@torch.no_grad()
def set_batchnorm_stats(bn, stats):
    """Make the batch-norm's running statistics normalize as `stats` do: mean = bias, var = scale^-2."""
    bn.running_mean.copy_(stats["latents_bias"].reshape(-1))
    bn.running_var.copy_(stats["latents_scale"].reshape(-1).pow(-2))
    return bn


def normalize_latents(z, stats):
    """(z - bias) * scale."""
    return (z - stats["latents_bias"]) * stats["latents_scale"]


def denormalize_latents(z, stats):
    """Undo normalize_latents: z / scale + bias."""
    return z / stats["latents_scale"] + stats["latents_bias"]


def latent_decoder(vae, stats):
    """Normalized latents -> uint8 (B, H, W, 3) images, as generate.py saves them: denormalize, the VAE's decode."""
    return lambda z: to_uint8_hwc(vae.decode(denormalize_latents(z, stats)))


def stats_from_diffusers_config(config, channels):
    """Statistics recorded in a (defaults-filled) diffusers VAE config, or None if it records none.

    diffusers normalizes latents as (z - latents_mean) * scaling_factor / latents_std.
    """
    if config.get("latents_mean") is None or config.get("latents_std") is None:
        return None
    mean = torch.tensor(config["latents_mean"], dtype=torch.float32).reshape(1, channels, 1, 1)
    std = torch.tensor(config["latents_std"], dtype=torch.float32).reshape(1, channels, 1, 1)
    return {"latents_scale": config["scaling_factor"] / std, "latents_bias": mean}


def stats_from_diffusers_scaling(raw_config, channels):
    """Statistics a diffusers VAE's config.json (as written, not defaults-filled) records, or None if none.

    latents_mean/latents_std first (as stats_from_diffusers_config); else the scalar shift_factor/scaling_factor of
    the FLUX and SD3 pipelines, (z - shift_factor) * scaling_factor (SD-XL: no shift, z * scaling_factor).
    """
    if raw_config.get("latents_mean") is not None and raw_config.get("latents_std") is not None:
        return stats_from_diffusers_config({"scaling_factor": 0.18215, **raw_config}, channels)  # diffusers' default
    if raw_config.get("scaling_factor") is None and raw_config.get("shift_factor") is None:
        return None
    scale, shift = raw_config.get("scaling_factor") or 1.0, raw_config.get("shift_factor") or 0.0
    return {"latents_scale": torch.full((1, channels, 1, 1), float(scale)),
            "latents_bias": torch.full((1, channels, 1, 1), float(shift))}


def diffusers_config_from_stats(stats, scaling_factor=1.0):
    """The diffusers config entries that normalize as `stats` do, (z - latents_mean) * scaling_factor / latents_std:
    latents_mean = bias, latents_std = scaling_factor / scale."""
    scale = stats["latents_scale"].detach().cpu().double().flatten()
    bias = stats["latents_bias"].detach().cpu().double().flatten()
    return {"scaling_factor": scaling_factor, "latents_mean": bias.tolist(),
            "latents_std": (scaling_factor / scale).tolist()}


def check_latents_stats(stats, source):
    """stats if it is {"latents_scale", "latents_bias"} of (1, C, 1, 1) tensors, else UserError naming source."""
    keys = ("latents_scale", "latents_bias")
    if not (isinstance(stats, dict) and all(torch.is_tensor(stats.get(key)) for key in keys)
            and stats["latents_scale"].dim() == stats["latents_bias"].dim() == 4):
        held = f"keys {', '.join(map(str, stats))}" if isinstance(stats, dict) else f"a {type(stats).__name__}"
        raise UserError(f"{source} holds {held}, not latent statistics {{'latents_scale', 'latents_bias'}} of "
                        "(1, C, 1, 1) tensors: write it again with save_vae_weights.py")
    return stats


def latents_stats_path(vae_ckpt):
    """NAME-latents-stats.pt beside NAME.pt."""
    path = Path(vae_ckpt)
    return path.with_name(path.stem + STATS_SUFFIX)


class LatentMoments:
    """Running per-channel mean and variance of latents (B, C, h, w) over images and positions, in float64 on the
    latents' device (nothing is read back to the host)."""

    def __init__(self):
        self.total, self.total_sq, self.count = 0.0, 0.0, 0

    def update(self, z):
        """Add a batch of latents; returns self."""
        z = z.detach().double()
        self.total = self.total + z.sum(dim=(0, 2, 3))
        self.total_sq = self.total_sq + z.pow(2).sum(dim=(0, 2, 3))
        self.count += z.numel() // z.shape[1]
        return self

    def mean_var(self):
        """(mean, variance) per channel."""
        mean = self.total / self.count
        return mean, (self.total_sq / self.count - mean.pow(2)).clamp_min(0)

    def mean_std(self):
        """(mean, standard deviation) per channel."""
        mean, var = self.mean_var()
        return mean, var.sqrt()


@torch.no_grad()
def estimate_latents_stats(vae, batches, device):
    """Per-channel statistics of posterior samples over a few uint8 batches: {"latents_scale", "latents_bias"}."""
    moments = LatentMoments()
    for images in batches:
        moments.update(vae.encode(preprocess_imgs_vae(images.to(device))).sample())
    mean, var = moments.mean_var()
    return {key: value.float() for key, value in stats_from_batchnorm(mean, var.clamp_min(1e-8)).items()}
