"""Convert our AutoencoderKL to and from diffusers `AutoencoderKL` folders (config.json + safetensors).

Our keys follow the published LDM layout (encoder.down.0.block.0.nin_shortcut, mid.attn_1.q, decoder.up.3...);
diffusers names the same tensors down_blocks/resnets/attentions, numbers decoder blocks from the lowest
resolution up, and stores attention projections as Linear (C, C) weights instead of 1x1 convs (C, C, 1, 1).
"""
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.autoencoder import AutoencoderKL, vae_models
from utils.checkpoint import atomic_save, load_state_dict_strict

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
STATS_NAME = "latents_stats.pt"
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


def _layout(vae):
    """What distinguishes one of our layouts from another."""
    return (vae.ch, vae.ch_mult, vae.num_res_blocks, vae.attn_levels, vae.latent_channels)


def arch_of(vae):
    """Registry name (e.g. 'f8d4') whose layout `vae` has, or None."""
    for arch, build in vae_models.items():
        with torch.device("meta"):
            reference = build()
        if _layout(reference) == _layout(vae):
            return arch
    return None


def export_diffusers_vae(vae, arch, out_dir, latents_stats=None):
    """Write `vae` as a diffusers AutoencoderKL folder; latents_stats {"latents_scale", "latents_bias"} are recorded.

    diffusers normalizes latents as (z - latents_mean) * scaling_factor / latents_std; with scaling_factor 1 that
    is our (z - bias) * scale for latents_mean = bias and latents_std = 1 / scale.
    """
    if arch is not None and arch_of(vae) != arch:
        raise ValueError(f"VAE layout {_layout(vae)} is not the '{arch}' layout")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = diffusers_config(vae)
    if arch is not None:
        config["_repae_arch"] = arch
    if latents_stats is not None:
        scale = latents_stats["latents_scale"].detach().cpu().double().flatten()
        bias = latents_stats["latents_bias"].detach().cpu().double().flatten()
        config.update(scaling_factor=1.0, latents_mean=bias.tolist(), latents_std=(1.0 / scale).tolist())
        atomic_save({k: v.detach().cpu() for k, v in latents_stats.items()}, out_dir / STATS_NAME)
    else:
        (out_dir / STATS_NAME).unlink(missing_ok=True)  # never leave statistics of an earlier export behind
    save_file(to_diffusers_state_dict(vae), str(out_dir / WEIGHTS_NAMES[0]), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def is_diffusers_vae_folder(path):
    """True if `path` is a folder with a diffusers AutoencoderKL config.json and weights."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        return False
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return config.get("_class_name") == "AutoencoderKL" and any((path / name).is_file() for name in WEIGHTS_NAMES)


def _our_model_for(config, folder):
    """Build our AutoencoderKL with the layout a diffusers config describes, or raise ValueError."""
    expected = {"in_channels": 3, "out_channels": 3, "act_fn": "silu", "norm_num_groups": 32,
                "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
    for name, value in expected.items():
        if config.get(name, value) != value:
            raise ValueError(f"{folder}: unsupported diffusers VAE config {name}={config[name]!r}, need {value!r}")
    widths = list(config["block_out_channels"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    attn_levels = [i for i, kind in enumerate(down) if kind == "AttnDownEncoderBlock2D"]
    mirrored = ["AttnUpDecoderBlock2D" if i in attn_levels else "UpDecoderBlock2D" for i in reversed(range(len(down)))]
    known = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"}
    if set(down) - known or up != mirrored or len(widths) != len(down) or any(w % widths[0] for w in widths):
        raise ValueError(f"{folder}: unsupported diffusers VAE layout down={down} up={up} widths={widths}")
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
    if (folder / STATS_NAME).is_file():
        return torch.load(folder / STATS_NAME, map_location="cpu", weights_only=True)
    if config.get("latents_mean") is None or config.get("latents_std") is None:
        return None
    mean = torch.tensor(config["latents_mean"], dtype=torch.float32).reshape(1, channels, 1, 1)
    std = torch.tensor(config["latents_std"], dtype=torch.float32).reshape(1, channels, 1, 1)
    return {"latents_scale": config["scaling_factor"] / std, "latents_bias": mean}


def load_diffusers_vae_folder(folder):
    """Diffusers AutoencoderKL folder -> (our AutoencoderKL, float32 in eval mode; arch name or None; stats or None)."""
    import diffusers

    folder = Path(folder)
    if not is_diffusers_vae_folder(folder):
        raise ValueError(f"{folder} is not a diffusers AutoencoderKL folder (config.json + weights {WEIGHTS_NAMES})")
    config = json.loads((folder / CONFIG_NAME).read_text())
    with torch.device("meta"):  # every tensor is loaded below, so skip the random init
        vae = _our_model_for(config, folder)
    vae = vae.to_empty(device="cpu")
    # diffusers' own loader reads .safetensors or .bin and renames attention keys of older checkpoints.
    reference = diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    load_state_dict_strict(vae, from_diffusers_state_dict(vae, reference.state_dict()), str(folder))
    return vae.eval(), arch_of(vae), _latents_stats(folder, reference.config, vae.latent_channels)
