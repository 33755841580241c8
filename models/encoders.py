"""Frozen pretrained vision encoders that give REPA its alignment targets (the published `load_encoders`), via timm.

Names follow the published `{encoder_type}-{architecture}-{model_config}` scheme: dinov2-vit-{s,b,l,g}
(an encoder type containing "reg", e.g. dinov2reg-vit-b, selects the 4-register models), mocov3-vit-{s,b,l},
dinov1-vit-b, clip-vit-L, mae-vit-l, jepa-vit-h. Every encoder is a timm VisionTransformer whose input size makes a
16x16 token grid at 256 px (32x32 at 512 px); `encoder_patch_tokens` returns its patch tokens (B, T, D).

Weights of each encoder are looked up, first hit wins:
  1. the `ckpt` argument, else $REPAE_ENCODER_CKPT (comma-separated, one path or hub id per encoder, see
     utils.hub.resolve_weights);
  2. $REPAE_ENCODER_CKPT_<NAME>: the encoder name upper-cased, "-" -> "_" (REPAE_ENCODER_CKPT_DINOV2_VIT_B);
  3. the file the published code reads: ckpts/<file> under the working directory (MoCo v3, DINOv1, MAE, I-JEPA),
     the torch.hub checkpoint cache (official DINOv2 / DINOv1 / MAE / I-JEPA files), ~/.cache/clip/ViT-L-14.pt (CLIP);
  4. the timm weights on the Hugging Face hub (cache only when HF_HUB_OFFLINE is set).
A file may be in the official release format or a timm state dict (.pt/.pth/.safetensors).
"""
import os
import re
import warnings
import zipfile
from pathlib import Path

import huggingface_hub
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import checkpoint_filter_fn

from utils.checkpoint import load_file, load_state_dict_strict
from utils.hub import resolve_weights

CLIP_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)

# timm architecture of each (family, model_config).
TIMM_ARCHS = {
    "dinov2": {c: f"vit_{s}_patch14_dinov2" for c, s in zip("sblg", ("small", "base", "large", "giant"))},
    "dinov2reg": {c: f"vit_{s}_patch14_reg4_dinov2" for c, s in zip("sblg", ("small", "base", "large", "giant"))},
    "mocov3": {"s": "vit_small_patch16_224", "b": "vit_base_patch16_224", "l": "vit_large_patch16_224"},
    "dinov1": {"b": "vit_base_patch16_224"},
    "clip": {"L": "vit_large_patch14_clip_quickgelu_224"},
    "mae": {"l": "vit_large_patch16_224"},
    "jepa": {"h": "vit_huge_patch14_gap_224"},
}
# Deviations from the timm defaults: the published MoCo v3 ViT-S has 12 heads, not 6.
ARCH_OVERRIDES = {("mocov3", "s"): {"num_heads": 12}}
# timm pretrained tag of the official weights (its config names the official URL and the HF hub copy).
PRETRAINED_TAGS = {"dinov2": "lvd142m", "dinov2reg": "lvd142m", "dinov1": "dino", "clip": "openai", "mae": "mae",
                   "jepa": "in1k_ijepa"}
# File names the published code loads from ./ckpts.
PUBLISHED_FILES = {"mocov3": "mocov3_vit{}.pth", "dinov1": "dinov1_vit{}.pth", "mae": "mae_vit{}.pth",
                   "jepa": "ijepa_vit{}.pth"}
# These families see the image resized to 224 px per 256 px (patch 14); the others see it as is (patch 16).
RESIZED_FAMILIES = ("dinov2", "dinov2reg", "clip", "jepa")
# The published MAE and CLIP features are the last block's output, before the final norm.
UNNORMED_TYPES = ("mae", "clip")
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
MOCOV3_KEY_TYPOS = {"blocks.13.norm13": "blocks.13.norm1", "blocks.13.mlp.fc13": "blocks.13.mlp.fc1",
                    "blocks.14.norm14": "blocks.14.norm2", "blocks.14.mlp.fc14": "blocks.14.mlp.fc2"}


def encoder_family(encoder_type):
    """Published encoder_type -> key of TIMM_ARCHS ('dinov2reg' for any DINOv2 type containing 'reg')."""
    if "dinov2" in encoder_type:
        return "dinov2reg" if "reg" in encoder_type else "dinov2"
    return encoder_type


def parse_encoder_name(name):
    """'dinov2-vit-b' -> (encoder_type, architecture, model_config, family); ValueError if unsupported."""
    parts = name.split("-")
    if len(parts) != 3:
        raise ValueError(f"encoder name {name!r} is not ENCODERTYPE-ARCHITECTURE-CONFIG, e.g. dinov2-vit-b")
    encoder_type, architecture, model_config = parts
    family = encoder_family(encoder_type)
    if architecture != "vit" or model_config not in TIMM_ARCHS.get(family, {}):
        known = ", ".join(f"{f}-vit-{c}" for f, cs in TIMM_ARCHS.items() for c in cs)
        raise ValueError(f"unsupported encoder {name!r}; supported: {known}")
    return encoder_type, architecture, model_config, family


def resized_input_size(resolution):
    """Input side of the patch-14 families: 224 per 256 px as published (one token per 16 image pixels)."""
    return 14 * (resolution // 16)


def preprocess_raw_image(x, enc_type, resolution=None):
    """uint8 images (B, 3, H, W) -> the encoder's input, as the published training script (resolution: H by default)."""
    resolution = resolution or x.shape[-1]
    size = resized_input_size(resolution)
    x = x / 255.
    if "clip" in enc_type:
        return _normalize(F.interpolate(x, size, mode="bicubic"), CLIP_DEFAULT_MEAN, CLIP_DEFAULT_STD)
    x = _normalize(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    if "dinov2" in enc_type or "jepa" in enc_type:
        x = F.interpolate(x, size, mode="bicubic")
    return x


def _normalize(x, mean, std):
    """Per-channel (x - mean) / std, the arithmetic of torchvision's Normalize."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def encoder_patch_tokens(encoder, enc_type, x):
    """Patch tokens (B, T, D) of a preprocessed batch: class and register tokens dropped."""
    final_norm = not any(t in enc_type for t in UNNORMED_TYPES)
    return encoder.forward_intermediates(x, indices=1, norm=final_norm, output_fmt="NLC", intermediates_only=True)[0]


encode_patch_tokens = encoder_patch_tokens  # the name used in the project contracts


def load_encoders(enc_type, device, resolution=256, ckpt=None, random_init=False):
    """Frozen eval-mode encoders for a comma-separated enc_type -> (encoders, encoder_types, architectures)."""
    if resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16, got {resolution}")
    names = enc_type.split(",")
    ckpts = _split_ckpts(ckpt or os.environ.get("REPAE_ENCODER_CKPT"), len(names))
    encoders, encoder_types, architectures = [], [], []
    for name, path in zip(names, ckpts):
        encoder_type, architecture, model_config, family = parse_encoder_name(name)
        path = None if random_init else find_weights(name, path)
        encoder = build_encoder(family, model_config, resolution, device)
        if random_init:
            warnings.warn(f"encoder {name}: random weights (random_init=True); its features are meaningless")
        else:
            load_weights(encoder, family, path)
        encoders.append(encoder.requires_grad_(False).eval())
        encoder_types.append(encoder_type)
        architectures.append(architecture)
    return encoders, encoder_types, architectures


def _split_ckpts(ckpt, count):
    """Comma-separated checkpoint paths, one per encoder (empty entries: look up as usual)."""
    if not ckpt:
        return [None] * count
    paths = [p.strip() or None for p in str(ckpt).split(",")]
    if len(paths) != count:
        raise ValueError(f"{len(paths)} encoder checkpoint paths given ({ckpt!r}) for {count} encoders")
    return paths


def build_encoder(family, model_config, resolution, device="cpu"):
    """Randomly initialised timm ViT for one encoder, sized for the resolution's 16-per-256-px token grid."""
    img_size = resized_input_size(resolution) if family in RESIZED_FAMILIES else resolution
    kwargs = dict(img_size=img_size, num_classes=0, **ARCH_OVERRIDES.get((family, model_config), {}))
    with torch.device(device):  # build in place: no CPU detour for large models, and "meta" builds are free
        return timm.create_model(TIMM_ARCHS[family][model_config], pretrained=False, **kwargs)


def env_var_name(name):
    """Per-encoder weights variable: 'dinov2-vit-b' -> REPAE_ENCODER_CKPT_DINOV2_VIT_B."""
    return "REPAE_ENCODER_CKPT_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def weight_locations(name):
    """Local files where the weights of an encoder may lie, and the official download URL (or None)."""
    _, _, model_config, family = parse_encoder_name(name)
    files, url = [], None
    if family in PUBLISHED_FILES:
        files.append(Path("ckpts") / PUBLISHED_FILES[family].format(model_config))
    if family in PRETRAINED_TAGS:
        url = _pretrained_cfg(family, model_config).url or None
    if url:
        files.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url))
    if family == "clip":  # where OpenAI's clip.load() keeps its download
        files.append(Path("~/.cache/clip").expanduser() / f"ViT-{model_config}-14.pt")
    return files, url


def _pretrained_cfg(family, model_config):
    """timm's pretrained config of the official weights of one encoder."""
    return get_pretrained_cfg(f"{TIMM_ARCHS[family][model_config]}.{PRETRAINED_TAGS[family]}")


def find_weights(name, ckpt=None):
    """Path of the weights file of an encoder (see module docstring); FileNotFoundError says what to get."""
    variable = env_var_name(name)
    explicit = ckpt or os.environ.get(variable)
    if explicit:
        path = resolve_weights(explicit)  # or a hub id: hf://timm/vit_base_patch14_dinov2.lvd142m/model.safetensors
        if not path.is_file():
            raise FileNotFoundError(f"encoder {name}: weights file {explicit} does not exist")
        return path
    files, url = weight_locations(name)
    for path in files:
        if path.is_file():
            return path
    hub_file = _hf_hub_file(name)
    if hub_file is not None:
        return hub_file
    family = parse_encoder_name(name)[3]
    source = {
        "mocov3": "the MoCo v3 checkpoint from https://github.com/facebookresearch/moco-v3 (CONFIG.md)",
        "clip": "OpenAI CLIP ViT-L/14 (clip.load('ViT-L/14') downloads it there)",
    }.get(family, url)
    repo = hf_repo(name)
    hub = f" The timm copy on the Hugging Face hub ({repo}) is fetched when HF_HUB_OFFLINE is unset." if repo else ""
    raise FileNotFoundError(
        f"no weights for encoder {name}. Get {source} and save it as {files[0].absolute()}, or pass its path as "
        f"ckpt / set {variable}.{hub} Looked in: {', '.join(str(f.absolute()) for f in files)}. "
        f"For a smoke run without weights use random_init=True."
    )


def hf_repo(name):
    """Hugging Face hub repository of timm's copy of the encoder weights, or None."""
    _, _, model_config, family = parse_encoder_name(name)
    if family not in PRETRAINED_TAGS:
        return None
    return _pretrained_cfg(family, model_config).hf_hub_id or None


def _hf_hub_file(name):
    """timm's copy of the encoder weights from the Hugging Face hub (cache only when offline), or None."""
    repo = hf_repo(name)
    if repo is None:
        return None
    offline = huggingface_hub.constants.is_offline_mode() or \
        os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    for filename in HF_FILENAMES:
        if offline:
            cached = huggingface_hub.try_to_load_from_cache(repo, filename)
            if isinstance(cached, str):
                return Path(cached)
            continue
        try:
            return Path(huggingface_hub.hf_hub_download(repo, filename))
        except Exception:  # not in that repo, or hub unreachable: try the next name
            continue
    return None


def read_weights(path):
    """State dict (possibly wrapped, as released) from a .pt/.pth/.safetensors file or a TorchScript archive (CLIP)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            scripted = any(n.endswith("constants.pkl") for n in archive.namelist())
        if scripted:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    return load_file(path)


def load_weights(encoder, family, path):
    """Load official-format or timm-format weights into an encoder built by build_encoder (strict)."""
    state_dict = dict(read_weights(path))
    if family == "mocov3":
        state_dict = mocov3_to_timm(state_dict)
    # timm's filter unwraps "model"/"state_dict"/"encoder", converts the DINOv2 and OpenAI CLIP layouts and
    # resamples the position embedding to the model's grid (bicubic, antialiased: the published resampling).
    state_dict = checkpoint_filter_fn(state_dict, encoder)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}  # published encoders drop heads
    load_state_dict_strict(encoder, state_dict, source=f"encoder weights {path}")
    return encoder


def mocov3_to_timm(checkpoint):
    """MoCo v3 release ({"state_dict": module.base_encoder.*}) -> backbone keys, as the published fix; else as is."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    prefix = "module.base_encoder."
    if not any(k.startswith(prefix) for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue  # momentum encoder, predictor
        key = key[len(prefix):]
        for typo, fixed in MOCOV3_KEY_TYPOS.items():
            key = key.replace(typo, fixed)
        if "head" not in key and key.split(".")[0] != "fc":
            out[key] = value
    return out
