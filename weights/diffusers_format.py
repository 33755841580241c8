"""Convert our AutoencoderKL to and from diffusers `AutoencoderKL` folders (config.json + safetensors).

Our keys follow the LDM layout (encoder.down.0.block.0.nin_shortcut, mid.attn_1.q, decoder.up.3...);
diffusers names the same tensors down_blocks/resnets/attentions, numbers decoder blocks from the lowest
resolution up, and stores attention projections as Linear (C, C) weights instead of 1x1 convs (C, C, 1, 1).
"""
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.autoencoder import AutoencoderKL, DiffusersAutoencoder, vae_arch_of
from utils.errors import UserError
from utils.files import atomic_write
from weights.checkpoint import atomic_save, load_file, load_state_dict_strict, uninitialized
from weights.hub import DIFFUSERS_CONFIG, DIFFUSERS_STATS, DIFFUSERS_WEIGHTS
from weights.latent_stats import (
    check_latents_stats,
    diffusers_config_from_stats,
    stats_from_diffusers_config,
    stats_from_diffusers_scaling,
)

# The LDM convention places attention by feature-map size for a 256-px input (attn_resolutions).
RESOLUTION = 256

_BLOCK_RENAMES = [
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.", ".mid_block.attentions.0."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.norm_out\.", ".conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
    (r"(attentions\.\d+)\.q\.", r"\1.to_q."),
    (r"(attentions\.\d+)\.k\.", r"\1.to_k."),
    (r"(attentions\.\d+)\.v\.", r"\1.to_v."),
    (r"(attentions\.\d+)\.proj_out\.", r"\1.to_out.0."),
]


def _up_block(match, num_levels):
    """decoder.up.I.{block,attn,upsample}. -> decoder.up_blocks.(L-1-I).{resnets,attentions,upsamplers.0}."""
    child = {"block": "resnets", "attn": "attentions", "upsample": "upsamplers.0"}[match[2]]
    return f"decoder.up_blocks.{num_levels - 1 - int(match[1])}.{child}."


def _diffusers_key(key, num_levels):
    """Our state-dict key -> the diffusers key of the same tensor."""
    # diffusers numbers decoder blocks from the lowest resolution; ours by level (0 = full resolution).
    key = re.sub(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.", lambda m: _up_block(m, num_levels), key)
    for pattern, replacement in _BLOCK_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _is_attention_projection(diffusers_key):
    """True for the Linear weights diffusers uses where we have 1x1 convs."""
    return re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key) is not None


def to_diffusers_state_dict(vae):
    """Our model's weights under diffusers keys and shapes."""
    out = {}
    for key, tensor in vae.state_dict().items():
        new_key = _diffusers_key(key, len(vae.ch_mult))
        if _is_attention_projection(new_key):
            tensor = tensor.reshape(tensor.shape[:2])
        out[new_key] = tensor.detach().cpu().contiguous()
    return out


def from_diffusers_state_dict(vae, diffusers_state_dict):
    """Diffusers-keyed weights -> our keys for `vae`; keys it lacks stay as they are, so strict loading names them."""
    our_key = {_diffusers_key(key, len(vae.ch_mult)): key for key in vae.state_dict()}
    ours = {}
    for key, tensor in diffusers_state_dict.items():
        if _is_attention_projection(key) and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        ours[our_key.get(key, key)] = tensor
    return ours


def diffusers_config(vae):
    """The diffusers AutoencoderKL config that describes our model's layout."""
    import diffusers

    levels = range(len(vae.ch_mult))
    down = ["AttnDownEncoderBlock2D" if i in vae.attn_levels else "DownEncoderBlock2D" for i in levels]
    up = ["AttnUpDecoderBlock2D" if i in vae.attn_levels else "UpDecoderBlock2D" for i in reversed(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": diffusers.__version__,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [vae.ch * m for m in vae.ch_mult],
        "layers_per_block": vae.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": vae.latent_channels,
        "norm_num_groups": 32,
        "sample_size": RESOLUTION,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


def export_diffusers_vae(vae, arch, out_dir, latents_stats=None):
    """Write `vae` as a diffusers AutoencoderKL folder; latents_stats, if given, go into its config and a file."""
    layout = vae_arch_of(vae.state_dict())
    if arch is not None and layout != arch:
        raise ValueError(f"the VAE has the {layout or 'unregistered'} layout, not the '{arch}' layout")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = diffusers_config(vae)
    if arch is not None:
        config["_repae_arch"] = arch
    if latents_stats is not None:
        config.update(diffusers_config_from_stats(latents_stats))
        atomic_save({k: v.detach().cpu() for k, v in latents_stats.items()}, out_dir / DIFFUSERS_STATS)
    else:
        (out_dir / DIFFUSERS_STATS).unlink(missing_ok=True)  # never leave statistics of an earlier export behind
    with atomic_write(out_dir / DIFFUSERS_WEIGHTS[0]) as tmp:
        save_file(to_diffusers_state_dict(vae), str(tmp), metadata={"format": "pt"})
    with atomic_write(out_dir / DIFFUSERS_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def is_diffusers_vae_folder(path):
    """True if `path` is a folder with a diffusers AutoencoderKL config.json and weights."""
    path = Path(path)
    if not (path / DIFFUSERS_CONFIG).is_file():
        return False
    try:
        config = json.loads((path / DIFFUSERS_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return config.get("_class_name") == "AutoencoderKL" and any((path / name).is_file() for name in DIFFUSERS_WEIGHTS)


def _our_model_for(config, folder):
    """Build our AutoencoderKL with the layout a diffusers config describes, or raise UserError."""
    expected = {"in_channels": 3, "out_channels": 3, "act_fn": "silu", "norm_num_groups": 32,
                "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
    for name, value in expected.items():
        if config.get(name, value) != value:
            raise UserError(f"{folder}: diffusers VAE config {name}={config[name]!r} is not one of our layouts (need "
                            f"{value!r})")
    widths = list(config["block_out_channels"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    attn_levels = [i for i, kind in enumerate(down) if kind == "AttnDownEncoderBlock2D"]
    mirrored = ["AttnUpDecoderBlock2D" if i in attn_levels else "UpDecoderBlock2D" for i in reversed(range(len(down)))]
    known = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"}
    if set(down) - known or up != mirrored or len(widths) != len(down) or any(w % widths[0] for w in widths):
        raise UserError(f"{folder}: diffusers VAE layout down={down} up={up} widths={widths} is not one of our "
                        "layouts")
    return AutoencoderKL(
        embed_dim=config["latent_channels"],
        ch_mult=tuple(w // widths[0] for w in widths),
        ch=widths[0],
        num_res_blocks=config["layers_per_block"],
        attn_resolutions=tuple(RESOLUTION // 2 ** i for i in attn_levels),
        resolution=RESOLUTION,
    )


def _latents_stats(folder, config, channels):
    """latents_stats.pt if present, else from the (defaults-filled) config's latents_mean/std; None if neither."""
    if (folder / DIFFUSERS_STATS).is_file():
        return check_latents_stats(load_file(folder / DIFFUSERS_STATS), folder / DIFFUSERS_STATS)
    return stats_from_diffusers_config(config, channels)


def load_diffusers_vae_folder(folder):
    """Diffusers AutoencoderKL folder -> (our AutoencoderKL, float32 in eval mode; arch name or None; stats or None)."""
    import diffusers

    folder = Path(folder)
    if not is_diffusers_vae_folder(folder):
        raise UserError(f"{folder} is not a diffusers AutoencoderKL folder ({DIFFUSERS_CONFIG} + weights "
                         f"{DIFFUSERS_WEIGHTS})")
    config = json.loads((folder / DIFFUSERS_CONFIG).read_text())
    vae = uninitialized(_our_model_for, "cpu", config=config, folder=folder)
    # diffusers' own loader reads .safetensors or .bin and renames attention keys of older checkpoints.
    reference = diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    load_state_dict_strict(vae, from_diffusers_state_dict(vae, reference.state_dict()), str(folder))
    return vae.eval(), vae_arch_of(vae.state_dict()), _latents_stats(folder, reference.config, vae.latent_channels)


def read_diffusers_config(folder):
    """The config.json of a diffusers AutoencoderKL folder as written (not defaults-filled)."""
    return json.loads((Path(folder) / DIFFUSERS_CONFIG).read_text())


def empty_diffusers_autoencoder(config, device="cpu"):
    """DiffusersAutoencoder of a diffusers AutoencoderKL config on device, uninitialised: a strict load fills it."""
    import diffusers

    return uninitialized(lambda: DiffusersAutoencoder(diffusers.AutoencoderKL.from_config(config)), device)


def load_diffusers_autoencoder(folder):
    """Diffusers AutoencoderKL folder of any layout -> (DiffusersAutoencoder in float32 and eval mode, stats or None).

    Statistics: the folder's latents_stats.pt, else its config's latents_mean/latents_std, else its
    shift_factor/scaling_factor (stats_from_diffusers_scaling); None if it records none.
    """
    import diffusers

    folder = Path(folder)
    model = diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    vae = DiffusersAutoencoder(model).eval()
    if (folder / DIFFUSERS_STATS).is_file():
        return vae, check_latents_stats(load_file(folder / DIFFUSERS_STATS), folder / DIFFUSERS_STATS)
    return vae, stats_from_diffusers_scaling(read_diffusers_config(folder), vae.latent_channels)


def export_diffusers_autoencoder(vae_state, vae_config, out_dir, latents_stats, source):
    """Write the weights of a DiffusersAutoencoder as a diffusers AutoencoderKL folder of its own config.

    The config is vae_config unchanged (layout, scaling_factor, shift_factor) except latents_mean/latents_std, which
    record latents_stats in diffusers' convention with the config's scaling_factor (diffusers_config_from_stats);
    latents_stats.pt beside the weights holds them exactly. source names vae_state in errors.
    """
    config = {**vae_config, **diffusers_config_from_stats(latents_stats, vae_config.get("scaling_factor", 1.0))}
    vae = load_state_dict_strict(empty_diffusers_autoencoder(config), vae_state, source)
    out_dir = Path(out_dir)
    vae.diffusers_model.save_pretrained(out_dir, safe_serialization=True)
    atomic_save({k: v.detach().cpu() for k, v in latents_stats.items()}, out_dir / DIFFUSERS_STATS)
    return out_dir
