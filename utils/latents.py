"""VAE loading and the latent normalization shared by training, sampling and export."""
import warnings
from pathlib import Path

import torch

from models.autoencoder import vae_models
from utils.checkpoint import load_file, load_state_dict_strict
from utils.hub import resolve_weights

NO_CHECKPOINT = ("", "none", "None")


def preprocess_imgs_vae(images):
    """uint8 images -> floats in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def denormalize_latents(z, latents_scale, latents_bias):
    """Undo the SiT's latent normalizer: (z - bias) * scale -> z."""
    return z / latents_scale + latents_bias


def latents_stats_path(vae_ckpt):
    """NAME-latents-stats.pt beside NAME.pt, as the published scripts expect."""
    path = Path(vae_ckpt)
    return path.with_name(path.stem + "-latents-stats.pt")


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
    return {"latents_scale": var.rsqrt().float().view(1, -1, 1, 1), "latents_bias": mean.float().view(1, -1, 1, 1)}
