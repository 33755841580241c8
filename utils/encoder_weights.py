"""Where the weights of the REPA encoders come from, and `load_encoders`, which builds them loaded and frozen.

Weights of each encoder are looked up, first hit wins:
  1. the `ckpt` argument, else $REPAE_ENCODER_CKPT (comma-separated, one path or hub id per encoder, see
     utils.hub.resolve_weights);
  2. $REPAE_ENCODER_CKPT_<NAME>: the encoder name upper-cased, "-" -> "_" (REPAE_ENCODER_CKPT_DINOV2_VIT_B);
  3. the files REPA's code reads: ckpts/<file> under the working directory (MoCo v3, DINOv1, MAE, I-JEPA),
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
import torch
from timm.models import get_pretrained_cfg

from models.encoders import TIMM_ARCHS, build_encoder, parse_encoder_name, to_timm_state_dict
from utils.checkpoint import load_file, load_state_dict_strict
from utils.hub import hub_offline, resolve_weights

# timm pretrained tag of the official weights (its config names the official URL and the HF hub copy).
PRETRAINED_TAGS = {"dinov2": "lvd142m", "dinov2reg": "lvd142m", "dinov1": "dino", "clip": "openai", "mae": "mae",
                   "jepa": "in1k_ijepa"}
# File names REPA's code loads from ./ckpts.
CKPTS_FILES = {"mocov3": "mocov3_vit{}.pth", "dinov1": "dinov1_vit{}.pth", "mae": "mae_vit{}.pth",
               "jepa": "ijepa_vit{}.pth"}
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


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


def env_var_name(name):
    """Per-encoder weights variable: 'dinov2-vit-b' -> REPAE_ENCODER_CKPT_DINOV2_VIT_B."""
    return "REPAE_ENCODER_CKPT_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def weight_locations(name):
    """Local files where the weights of an encoder may lie, and the official download URL (or None)."""
    _, _, model_config, family = parse_encoder_name(name)
    files, url = [], None
    if family in CKPTS_FILES:
        files.append(Path("ckpts") / CKPTS_FILES[family].format(model_config))
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
    offline = hub_offline()
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
    state_dict = to_timm_state_dict(dict(read_weights(path)), family, encoder)
    load_state_dict_strict(encoder, state_dict, source=f"encoder weights {path}")
    return encoder
