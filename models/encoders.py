"""Frozen pretrained vision encoders that give REPA its alignment targets, as timm ViTs (networks only).

Names follow the REPA `{encoder_type}-{architecture}-{model_config}` scheme: dinov2-vit-{s,b,l,g}
(an encoder type containing "reg", e.g. dinov2reg-vit-b, selects the 4-register models), mocov3-vit-{s,b,l},
dinov1-vit-b, clip-vit-L, mae-vit-l, jepa-vit-h. Every encoder is a timm VisionTransformer whose input size makes a
16x16 token grid at 256 px (32x32 at 512 px); `encoder_patch_tokens` returns its patch tokens (B, T, D).
Where the weights come from: utils/encoder_weights.py.
"""
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import checkpoint_filter_fn

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
# Deviations from the timm defaults: the MoCo v3 ViT-S has 12 heads, not 6.
ARCH_OVERRIDES = {("mocov3", "s"): {"num_heads": 12}}
# These families see the image resized to 224 px per 256 px (patch 14); the others see it as is (patch 16).
RESIZED_FAMILIES = ("dinov2", "dinov2reg", "clip", "jepa")
# REPA aligns to the MAE and CLIP features of the last block's output, before the final norm.
UNNORMED_TYPES = ("mae", "clip")
MOCOV3_KEY_TYPOS = {"blocks.13.norm13": "blocks.13.norm1", "blocks.13.mlp.fc13": "blocks.13.mlp.fc1",
                    "blocks.14.norm14": "blocks.14.norm2", "blocks.14.mlp.fc14": "blocks.14.mlp.fc2"}


def encoder_family(encoder_type):
    """encoder_type -> key of TIMM_ARCHS ('dinov2reg' for any DINOv2 type containing 'reg')."""
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
    """Input side of the patch-14 families: 224 per 256 px (one token per 16 image pixels)."""
    return 14 * (resolution // 16)


def preprocess_raw_image(x, enc_type, resolution=None):
    """uint8 images (B, 3, H, W) -> the encoder's input (resolution: H by default)."""
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


def build_encoder(family, model_config, resolution, device="cpu"):
    """Randomly initialised timm ViT for one encoder, sized for the resolution's 16-per-256-px token grid."""
    img_size = resized_input_size(resolution) if family in RESIZED_FAMILIES else resolution
    kwargs = dict(img_size=img_size, num_classes=0, **ARCH_OVERRIDES.get((family, model_config), {}))
    with torch.device(device):  # build in place: no CPU detour for large models, and "meta" builds are free
        return timm.create_model(TIMM_ARCHS[family][model_config], pretrained=False, **kwargs)


def to_timm_state_dict(state_dict, family, encoder):
    """Official-format or timm-format weights -> the state dict of `encoder` (built by build_encoder)."""
    if family == "mocov3":
        state_dict = mocov3_to_timm(state_dict)
    # timm's filter unwraps "model"/"state_dict"/"encoder", converts the DINOv2 and OpenAI CLIP layouts and
    # resamples the position embedding to the model's grid (bicubic, antialiased, like REPA's hub models), in the
    # tensors' own dtype: a float16 or bfloat16 file's positions are resampled in float32 instead.
    state_dict = checkpoint_filter_fn(float32_tensors(state_dict), encoder)
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}  # REPA's encoders have no heads


def float32_tensors(state):
    """A (nested) checkpoint dict with its floating-point tensors in float32."""
    if isinstance(state, dict):
        return {key: float32_tensors(value) for key, value in state.items()}
    return state.float() if torch.is_tensor(state) and state.is_floating_point() else state


def mocov3_to_timm(checkpoint):
    """MoCo v3 release ({"state_dict": module.base_encoder.*}) -> backbone keys with REPA's key fixes; else as is."""
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
