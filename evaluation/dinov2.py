"""The FD-DINOv2 network as NVlabs/edm2 defines it (calculate_metrics.py, DINOv2Detector, after layer6ai-labs/dgm-eval)
and where its weights are found.

edm2 feeds torch.hub's `dinov2_vitl14` uint8 images turned into float32 (0..255), resized to 224x224 (bicubic,
antialiased: its default resize_mode 'torch'), divided by 255 and normalized with the ImageNet mean and std; the
feature is the hub model's output, the class token after the final norm (1024 values for ViT-L/14).

Here the network is the project's timm ViT (models/encoders.py) built for 224-px inputs, with the official weights
found as the training encoders' are (weights/encoders.py: --dinov2-weights, $REPAE_ENCODER_CKPT_DINOV2_VIT_L, the
torch hub cache, the Hugging Face cache). The hub model interpolates its 37x37 position embedding to the 16x16 grid of
a 224-px input at every forward, DINOv2's own way (bicubic by the scale factor (16 + 0.1) / 37, not antialiased);
that interpolation is done once here, when the weights are loaded, in place of timm's resampling (antialiased, to the
exact size), so that the features are the hub model's.
"""
import math
import os
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from models.encoders import build_encoder, parse_encoder_name, to_timm_state_dict
from utils.errors import UserError
from weights.checkpoint import load_state_dict_strict
from weights.encoders import env_var_name, find_weights, read_weights, weight_locations

DINOV2_ENCODER = "dinov2-vit-l"  # edm2's dinov2_vitl14 (tests put a small ViT here)
INPUT_SIZE = 224
# build_encoder sizes a DINOv2 for 14 input pixels per 16 image pixels: this resolution gives the 224-px input.
ENCODER_RESOLUTION = INPUT_SIZE * 16 // 14
POS_EMBED_OFFSET = 0.1  # DINOv2's interpolate_offset


def dinov2_weights_path(path=None, fetch=True):
    """The DINOv2 weights: `path` (a file or hub id), else where find_weights looks for the encoder's official weights.

    fetch=False looks only on this machine. A missing file raises FileNotFoundError naming it and where to put it.
    """
    try:
        return find_weights(DINOV2_ENCODER, path, fetch=fetch)
    except FileNotFoundError:
        if path or os.environ.get(env_var_name(DINOV2_ENCODER)):  # its message names the file given
            raise
        files, url = weight_locations(DINOV2_ENCODER)
        raise FileNotFoundError(
            f"DINOv2 weights {files[0].name} (FD-DINOv2) not found: download {url} into {files[0].parent} (set "
            f"TORCH_HOME for another cache), or point --dinov2-weights or {env_var_name(DINOV2_ENCODER)} at the file, "
            "or leave fd_dinov2 out of --metrics, or pass --dinov2-random-init (smoke runs)") from None


def hub_pos_embed(pos_embed, grid):
    """A (1, 1 + side^2, D) position embedding for a grid x grid patch input, as DINOv2's interpolate_pos_encoding
    makes it: the class position as it is, the patch positions resized bicubically in float32 by the scale factor
    (grid + 0.1) / side, not antialiased."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    if side == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = (grid + POS_EMBED_OFFSET) / side
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pos_embed[:, :1].float(), patches], dim=1).to(pos_embed.dtype)


def dinov2_input(images):
    """uint8 (B, H, W, 3) images -> the network's float32 (B, 3, 224, 224) input, as edm2's DINOv2Detector makes it."""
    x = images.permute(0, 3, 1, 2).contiguous().to(torch.float32)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
    x = x / 255
    x = x - torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device).reshape(1, -1, 1, 1)
    return x / torch.tensor(IMAGENET_DEFAULT_STD, device=x.device).reshape(1, -1, 1, 1)


class DINOv2Features(torch.nn.Module):
    """The DINOv2 ViT of FD-DINOv2 giving the final-norm class token of uint8 NHWC images.

    weights_path None keeps the random weights of `encoder` (smoke runs).
    """

    def __init__(self, encoder, weights_path=None):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.weights_path = weights_path

    @torch.no_grad()
    def features(self, images):
        """uint8 (B, H, W, 3) tensor on the network's device -> float32 numpy (B, D) class tokens."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        # timm's forward with no head: the final norm's output, pooled by its class token
        return self.encoder(dinov2_input(images)).float().cpu().numpy()


def unit_layer_scales(encoder):
    """The encoder with its layer scales set to 1 (DINOv2's own init), not timm's 1e-5, which leaves a random
    network's class token nearly the same for every image; returns it."""
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if name.endswith(".gamma"):
                parameter.fill_(1.0)
    return encoder


def build_dinov2(weights=None, random_init=False, device="cpu"):
    """The FD-DINOv2 network on device: from `weights` (or where dinov2_weights_path looks) or random."""
    _, _, model_config, family = parse_encoder_name(DINOV2_ENCODER)
    if random_init:
        warnings.warn("random DINOv2 weights: FD-DINOv2 is only a smoke test")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random network in every run, on every device
            encoder = build_encoder(family, model_config, ENCODER_RESOLUTION)
        return DINOv2Features(unit_layer_scales(encoder)).to(device)
    path = dinov2_weights_path(weights)
    state_dict = read_weights(path)
    if not isinstance(state_dict, Mapping):
        raise UserError(f"DINOv2 weights {path} hold a {type(state_dict).__name__}, not a state dict")
    state_dict = dict(state_dict)
    encoder = build_encoder(family, model_config, ENCODER_RESOLUTION, device="meta").to_empty(device="cpu")
    if "pos_embed" in state_dict:
        state_dict["pos_embed"] = hub_pos_embed(state_dict["pos_embed"], encoder.patch_embed.grid_size[0])
    load_state_dict_strict(encoder, to_timm_state_dict(state_dict, family, encoder), source=f"DINOv2 weights {path}",
                           flags="--dinov2-weights")
    return DINOv2Features(encoder, path).to(device)

