"""A training checkpoint read for inference: its model settings, its EMA SiT and its VAE (what generate.py and
demo.py sample with).
"""
import argparse
from pathlib import Path

from utils.errors import UserError
from utils.files import read_json

# Training defaults for the model settings, in case an older args.json lacks one.
CONFIG_DEFAULTS = dict(resolution=256, num_classes=1000, encoder_depth=8, cfg_prob=0.1, qk_norm=False,
                       fused_attn=True, bn_momentum=0.1)


def load_config(exp_path, checkpoint, ckpt_path):
    """Model settings: EXP/args.json when there is an experiment folder, else the checkpoint's own args."""
    from models.autoencoder import vae_names
    from models.sit import SiT_models

    if exp_path is not None:
        config = read_json(Path(exp_path) / "args.json", "restore the training run's args.json, or pass "
                           "--ckpt alone to take the settings from the checkpoint")
    elif "args" in checkpoint:
        saved = checkpoint["args"]
        config = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved)
    else:
        raise UserError(f"{ckpt_path} holds no training args: pass --exp-path EXP with EXP/args.json")
    config = {**CONFIG_DEFAULTS, **config}
    if config.get("model") not in SiT_models:
        raise UserError(f"unknown model {config.get('model')!r} in the training args; known: {', '.join(SiT_models)}")
    if config.get("vae") not in vae_names:
        raise UserError(f"unknown vae {config.get('vae')!r} in the training args; known: {', '.join(vae_names)}")
    return config


def check_training_checkpoint(checkpoint, ckpt_path):
    """Raise UserError unless the checkpoint is a training checkpoint with EMA weights."""
    from collections.abc import Mapping

    if not isinstance(checkpoint, Mapping) or "ema" not in checkpoint:
        held = f"keys {', '.join(map(str, checkpoint))}" if isinstance(checkpoint, Mapping) else \
            f"a {type(checkpoint).__name__}"
        raise UserError(f"{ckpt_path} holds {held}, not a training checkpoint with 'ema' weights: pass "
                        "EXP/checkpoints/STEP.pt of a training run")


def projector_shapes(ema_state):
    """(z_dims, projector_dim) read off the projector weights (projector_dim None without projectors), so no
    representation encoder is needed."""
    z_dims = []
    while f"projectors.{len(z_dims)}.4.weight" in ema_state:
        z_dims.append(ema_state[f"projectors.{len(z_dims)}.4.weight"].shape[0])
    projector_dim = ema_state["projectors.0.0.weight"].shape[0] if z_dims else None
    return z_dims, projector_dim


def load_sit(config, ema_state, source, shape, device):
    """The SiT of the training args for latents of `shape` (C, H, W) with the EMA weights, in eval mode."""
    from models.sit import build_sit
    from weights.checkpoint import check_state_dict, load_state_dict_strict, uninitialized

    check_state_dict(ema_state, f"{source} [ema]", "SiT")
    z_dims, projector_dim = projector_shapes(ema_state)
    model = uninitialized(build_sit, device, model_name=config["model"], latent_shape=shape, z_dims=z_dims,
                          num_classes=config["num_classes"], cfg_prob=config["cfg_prob"],
                          encoder_depth=config["encoder_depth"], bn_momentum=config["bn_momentum"],
                          qk_norm=config["qk_norm"], fused_attn=config["fused_attn"], projector_dim=projector_dim)
    load_state_dict_strict(model, ema_state, f"{source} [ema]")
    return model.eval()


def load_autoencoder(config, checkpoint, source, vae_ckpt, device):
    """(VAE, latent statistics or None) where None means: use the SiT batch-norm's (REPA-E checkpoints)."""
    from weights.vae import NO_CHECKPOINT, load_vae, vae_from_checkpoint

    arch = config["vae"]
    if "vae" in checkpoint:
        if vae_ckpt is not None:
            return load_vae(arch, vae_ckpt, require_stats=False, arch_flag=None)[0], None
        return vae_from_checkpoint(arch, checkpoint, source, device), None  # --vae diffusers: its vae_config
    # latent-diffusion-only checkpoints were trained on a fixed VAE and its statistics file
    vae_ckpt = vae_ckpt or config.get("vae_ckpt")
    if vae_ckpt is None or vae_ckpt in NO_CHECKPOINT:  # a random VAE would decode noise
        raise UserError(f"{source} holds no VAE and the training args name none (vae_ckpt: {vae_ckpt}): pass "
                        "--vae-ckpt with the VAE the latents were cached with")
    return load_vae(arch, vae_ckpt, arch_flag=None)


def load_for_sampling(ckpt_path, *, exp_path, vae_ckpt, device):
    """(EMA SiT, VAE, latent statistics, latent shape) of a training checkpoint, on device in eval mode, ready for
    the samplers; vae_ckpt (or None) replaces the run's VAE."""
    import torch

    from models.autoencoder import latent_shape
    from weights.checkpoint import load_file
    from weights.latent_stats import stats_from_batchnorm

    checkpoint = load_file(ckpt_path, map_location=device)
    check_training_checkpoint(checkpoint, ckpt_path)
    config = load_config(exp_path, checkpoint, ckpt_path)
    vae, stats = load_autoencoder(config, checkpoint, ckpt_path, vae_ckpt, device)
    shape = latent_shape(vae, config["resolution"])
    model = load_sit(config, checkpoint["ema"], ckpt_path, shape, device)
    if stats is None:  # REPA-E checkpoints: the statistics of the SiT's batch-norm
        stats = stats_from_batchnorm(model.bn.running_mean, model.bn.running_var)
    stats = {key: value.to(device, torch.float32) for key, value in stats.items()}
    return model.to(device), vae.to(device).eval(), stats, shape
