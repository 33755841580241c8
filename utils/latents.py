"""VAE loading, latent geometry and latent statistics, shared by training, sampling and export.

Latent statistics have one form: {"latents_scale": (1,C,1,1), "latents_bias": (1,C,1,1)} (the NAME-latents-stats.pt
file format); a latent z is normalized as (z - bias) * scale. Every conversion from or to another form is here.
"""
import warnings
from pathlib import Path

import torch

from models.autoencoder import DIFFUSERS_VAE, DiffusersAutoencoder, vae_models, vae_names
from utils.checkpoint import load_file, load_state_dict_strict
from utils.errors import UserError
from utils.hub import (
    DIFFUSERS_CONFIG,
    DIFFUSERS_STATS,
    DIFFUSERS_WEIGHTS,
    HUB_PREFIX,
    STATS_SUFFIX,
    parse_hub_spec,
    resolve_weights,
)

NO_CHECKPOINT = ("", "none", "None")
VAE_CONFIG_KEY = "vae_config"  # training-checkpoint entry: the diffusers config of a --vae diffusers run


def preprocess_imgs_vae(images):
    """uint8 images -> floats in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def latent_shape(vae, resolution):
    """(channels, size, size) of the latents of resolution-pixel square images through `vae`."""
    factor = vae.downsample_factor
    if resolution % factor:
        raise UserError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}: "
                        "check --resolution and --vae")
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


def diffusers_vae_folder(vae_ckpt):
    """Local diffusers AutoencoderKL folder of a path or hub id (hf://OWNER/NAME[@REV]/SUBFOLDER fetches the
    subfolder's config and weights, e.g. the vae/ of a text-to-image pipeline repo); else UserError."""
    from utils.diffusers_vae import is_diffusers_vae_folder

    if vae_ckpt in NO_CHECKPOINT or vae_ckpt is None:
        raise UserError(f"--vae {DIFFUSERS_VAE} needs a VAE checkpoint: pass --vae-ckpt FOLDER_OR_HUB_ID, a diffusers "
                        "AutoencoderKL folder (its config.json decides the layout)")
    hub = None if Path(vae_ckpt).exists() else parse_hub_spec(vae_ckpt)
    if hub is not None and hub[1] is not None and not Path(hub[1]).suffix:  # a folder of the repo
        repo, subfolder, revision = hub
        base = f"{HUB_PREFIX}{repo}{f'@{revision}' if revision else ''}/{subfolder.strip('/')}"
        path = resolve_weights(f"{base}/{DIFFUSERS_CONFIG}").parent
        resolve_weights(f"{base}/{DIFFUSERS_WEIGHTS[0]}")
    else:
        path = resolve_weights(vae_ckpt, kind="vae")
    if not is_diffusers_vae_folder(path):
        raise UserError(f"{vae_ckpt} is no diffusers AutoencoderKL folder ({DIFFUSERS_CONFIG} with _class_name "
                        f"AutoencoderKL, and {' or '.join(DIFFUSERS_WEIGHTS)}): for --vae {DIFFUSERS_VAE} pass such a "
                        "folder, e.g. the vae/ subfolder of a FLUX, SD3.5 or SD-XL download")
    return path


def vae_downsample_factor(arch, vae_ckpt):
    """Downsampling factor of the VAE `arch` (for 'diffusers', of vae_ckpt's config); no weights are read."""
    if arch == DIFFUSERS_VAE:
        from utils.diffusers_vae import read_diffusers_config

        return DiffusersAutoencoder.downsample_factor_of(read_diffusers_config(diffusers_vae_folder(vae_ckpt)))
    if arch not in vae_models:
        raise UserError(f"--vae {arch} is unknown; known: {', '.join(vae_names)}")
    with torch.device("meta"):  # the layout only: nothing allocated
        return vae_models[arch]().downsample_factor


def load_vae(arch, vae_ckpt, require_stats=True):
    """Build the autoencoder `arch` from vae_ckpt (NAME.pt, .safetensors, a diffusers folder or a hub id).

    Returns (vae, latents_stats) where latents_stats is {"latents_scale", "latents_bias"} or None.
    vae_ckpt 'none' gives a randomly initialised VAE without statistics (smoke runs only). arch 'diffusers' wraps the
    diffusers AutoencoderKL of the folder vae_ckpt, whatever its layout (DiffusersAutoencoder).
    """
    if arch == DIFFUSERS_VAE:
        from utils.diffusers_vae import load_diffusers_autoencoder

        path = diffusers_vae_folder(vae_ckpt)
        vae, stats = load_diffusers_autoencoder(path)
    elif arch not in vae_models:
        raise UserError(f"--vae {arch} is unknown; known: {', '.join(vae_names)}")
    elif vae_ckpt in NO_CHECKPOINT or vae_ckpt is None:
        warnings.warn("no VAE checkpoint given: using a randomly initialised VAE (smoke runs only)")
        return vae_models[arch](), None
    else:
        path = resolve_weights(vae_ckpt, kind="vae")
        vae, stats = _load_registered_vae(arch, path)
    if stats is None and require_stats:
        expected = (f"{path / DIFFUSERS_STATS} or latent statistics in its {DIFFUSERS_CONFIG}" if path.is_dir()
                    else latents_stats_path(path))
        raise FileNotFoundError(f"latent statistics for {path} not found: expected {expected} "
                                "with {'latents_scale', 'latents_bias'} (written by save_vae_weights.py)")
    return vae, stats


def vae_checkpoint_entries(vae):
    """What a training checkpoint keeps beside the `vae` weights to rebuild the VAE without its folder: the diffusers
    config of a DiffusersAutoencoder as `vae_config` (nothing for our own layouts, which --vae names)."""
    return {VAE_CONFIG_KEY: vae.config} if isinstance(vae, DiffusersAutoencoder) else {}


def vae_from_checkpoint(arch, checkpoint, source, device="cpu"):
    """The VAE of a REPA-E training checkpoint in eval mode (its `vae` weights; layout `arch` or its `vae_config`)."""
    if arch == DIFFUSERS_VAE:
        from utils.diffusers_vae import empty_diffusers_autoencoder

        if VAE_CONFIG_KEY not in checkpoint:
            raise UserError(f"{source} has no '{VAE_CONFIG_KEY}' entry for its --vae {DIFFUSERS_VAE} weights: it was "
                            "not written by train_repae.py --vae diffusers; pass the VAE folder with --vae-ckpt")
        vae = empty_diffusers_autoencoder(checkpoint[VAE_CONFIG_KEY], device)
    else:
        with torch.device("meta"):  # every tensor is loaded below, so skip the random init
            vae = vae_models[arch]()
        vae = vae.to_empty(device=device)
    return load_state_dict_strict(vae, checkpoint["vae"], f"{source} [vae]").eval()


def _load_registered_vae(arch, path):
    """(our AutoencoderKL `arch`, stats or None) from a state-dict file or a diffusers folder of that layout."""
    if path.is_dir():
        from utils.diffusers_vae import load_diffusers_vae_folder
        vae, folder_arch, stats = load_diffusers_vae_folder(path)
        if folder_arch != arch:
            raise UserError(f"{path} holds a {folder_arch} VAE but --vae is {arch}: pass --vae {folder_arch}")
        return vae, stats
    vae = vae_models[arch]()
    load_state_dict_strict(vae, load_file(path), str(path))
    stats_path = latents_stats_path(path)
    return vae, check_latents_stats(load_file(stats_path), stats_path) if stats_path.is_file() else None


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
