"""VAE loading, latent geometry and latent statistics, shared by training, sampling and export.

Latent statistics have one form: {"latents_scale": (1,C,1,1), "latents_bias": (1,C,1,1)} (the NAME-latents-stats.pt
file format); a latent z is normalized as (z - bias) * scale. Every conversion from or to another form is here.
"""
import warnings
from pathlib import Path

import torch

from models.autoencoder import vae_models
from utils.checkpoint import load_file, load_state_dict_strict
from utils.hub import STATS_SUFFIX, resolve_weights

NO_CHECKPOINT = ("", "none", "None")


def preprocess_imgs_vae(images):
    """uint8 images -> floats in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def latent_shape(vae, resolution):
    """(channels, size, size) of the latents of resolution-pixel square images through `vae`."""
    factor = vae.downsample_factor
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return vae.latent_channels, resolution // factor, resolution // factor


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


def stats_from_diffusers_config(config, channels):
    """Statistics recorded in a (defaults-filled) diffusers VAE config, or None if it records none.

    diffusers normalizes latents as (z - latents_mean) * scaling_factor / latents_std.
    """
    if config.get("latents_mean") is None or config.get("latents_std") is None:
        return None
    mean = torch.tensor(config["latents_mean"], dtype=torch.float32).reshape(1, channels, 1, 1)
    std = torch.tensor(config["latents_std"], dtype=torch.float32).reshape(1, channels, 1, 1)
    return {"latents_scale": config["scaling_factor"] / std, "latents_bias": mean}


def diffusers_config_from_stats(stats):
    """The diffusers config entries that normalize as `stats` do: latents_mean = bias, latents_std = 1 / scale."""
    scale = stats["latents_scale"].detach().cpu().double().flatten()
    bias = stats["latents_bias"].detach().cpu().double().flatten()
    return {"scaling_factor": 1.0, "latents_mean": bias.tolist(), "latents_std": (1.0 / scale).tolist()}


def latents_stats_path(vae_ckpt):
    """NAME-latents-stats.pt beside NAME.pt."""
    path = Path(vae_ckpt)
    return path.with_name(path.stem + STATS_SUFFIX)


def load_vae(arch, vae_ckpt, require_stats=True):
    """Build the autoencoder `arch` from vae_ckpt (NAME.pt, .safetensors, a diffusers folder or a hub id).

    Returns (vae, latents_stats) where latents_stats is {"latents_scale", "latents_bias"} or None.
    vae_ckpt 'none' gives a randomly initialised VAE without statistics (smoke runs only).
    """
    if vae_ckpt in NO_CHECKPOINT or vae_ckpt is None:
        warnings.warn("no VAE checkpoint given: using a randomly initialised VAE (smoke runs only)")
        return vae_models[arch](), None
    path = resolve_weights(vae_ckpt, kind="vae")
    if path.is_dir():
        from utils.diffusers_vae import load_diffusers_vae_folder
        vae, folder_arch, stats = load_diffusers_vae_folder(path)
        if folder_arch != arch:
            raise ValueError(f"{path} holds a {folder_arch} VAE but --vae is {arch}")
    else:
        vae = vae_models[arch]()
        load_state_dict_strict(vae, load_file(path), str(path))
        stats_path = latents_stats_path(path)
        stats = load_file(stats_path) if stats_path.is_file() else None
    if stats is None and require_stats:
        raise FileNotFoundError(
            f"latent statistics for {path} not found: expected {latents_stats_path(path)} "
            "with {'latents_scale', 'latents_bias'} (written by save_vae_weights.py)")
    return vae, stats


@torch.no_grad()
def estimate_latents_stats(vae, batches, device):
    """Per-channel statistics of posterior samples over a few uint8 batches: {"latents_scale", "latents_bias"}."""
    total, total_sq, count = 0.0, 0.0, 0
    for images in batches:
        z = vae.encode(preprocess_imgs_vae(images.to(device))).sample().double()
        total = total + z.sum(dim=(0, 2, 3))
        total_sq = total_sq + (z * z).sum(dim=(0, 2, 3))
        count += z.numel() // z.shape[1]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(1e-8)
    return {key: value.float() for key, value in stats_from_batchnorm(mean, var).items()}
