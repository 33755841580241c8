"""Where the weights of the REPA encoders come from, and `load_encoders`, which builds them loaded and frozen.

Weights of each encoder are looked up, first hit wins:
  1. the `ckpt` argument, else $REPAE_ENCODER_CKPT (comma-separated, one path or hub id per encoder, see
     weights.hub.resolve_weights);
  2. $REPAE_ENCODER_CKPT_<NAME>: the encoder name upper-cased, "-" -> "_" (REPAE_ENCODER_CKPT_DINOV2_VIT_B);
  3. the files REPA's code reads: ckpts/<file> under the working directory (MoCo v3, DINOv1, MAE, I-JEPA),
     the torch.hub checkpoint cache (official DINOv2 / DINOv1 / MAE / I-JEPA files), ~/.cache/clip/ViT-L-14.pt (CLIP);
  4. the timm weights in the Hugging Face cache, else fetched from the hub unless HF_HUB_OFFLINE is set (one
     request, no retries: an unreachable hub fails within HF_HUB_ETAG_TIMEOUT seconds).
A file may be in the official release format or a timm state dict (.pt/.pth/.safetensors).
"""
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import EntryNotFoundError
from timm.models import get_pretrained_cfg

from models.encoders import TIMM_ARCHS, build_encoder, parse_encoder_name, to_timm_state_dict
from utils.errors import UserError
from weights.checkpoint import load_file, load_state_dict_strict
from weights.hub import hub_offline, resolve_weights

# timm pretrained tag of the official weights (its config names the official URL and the HF hub copy).
PRETRAINED_TAGS = {"dinov2": "lvd142m", "dinov2reg": "lvd142m", "dinov1": "dino", "clip": "openai", "mae": "mae",
                   "jepa": "in1k_ijepa"}
# File names REPA's code loads from ./ckpts.
CKPTS_FILES = {"mocov3": "mocov3_vit{}.pth", "dinov1": "dinov1_vit{}.pth", "mae": "mae_vit{}.pth",
               "jepa": "ijepa_vit{}.pth"}
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def load_encoders(enc_type, device, resolution=256, ckpt=None, random_init=False, allow_torchscript=False):
    """Frozen eval-mode encoders for a comma-separated enc_type -> (encoders, encoder_types, architectures).

    allow_torchscript lets weights come from a TorchScript archive (the CLIP file), whose loading runs its code.
    """
    if resolution % 16:
        raise UserError(f"--resolution must be a multiple of 16 for the encoders, got {resolution}")
    names = enc_type.split(",")
    ckpts = _split_ckpts(ckpt or os.environ.get("REPAE_ENCODER_CKPT"), len(names))
    parsed = [_parse_name(name) for name in names]  # every name and file checked before anything is built
    paths = [None if random_init else find_weights(name, path) for name, path in zip(names, ckpts)]
    for path in paths:
        if path is not None:
            _check_torchscript(path, allow_torchscript)
    encoders, encoder_types, architectures = [], [], []
    for name, path, (encoder_type, architecture, model_config, family) in zip(names, paths, parsed):
        encoder = build_encoder(family, model_config, resolution, device)
        if random_init:
            warnings.warn(f"encoder {name}: random weights (--enc-random-init); its features are meaningless")
        else:
            load_weights(encoder, family, path, allow_torchscript)
        encoders.append(encoder.requires_grad_(False).eval())
        encoder_types.append(encoder_type)
        architectures.append(architecture)
    return encoders, encoder_types, architectures


def _parse_name(name):
    """parse_encoder_name, its error as a UserError naming --enc-type."""
    try:
        return parse_encoder_name(name)
    except ValueError as error:
        raise UserError(f"--enc-type: {error}") from None


def _split_ckpts(ckpt, count):
    """Comma-separated checkpoint paths, one per encoder (empty entries: look up as usual)."""
    if not ckpt:
        return [None] * count
    paths = [p.strip() or None for p in str(ckpt).split(",")]
    if len(paths) != count:
        raise UserError(f"{len(paths)} encoder checkpoint paths given ({ckpt!r}; --enc-ckpt or REPAE_ENCODER_CKPT) "
                        f"for {count} encoders (--enc-type): give one per encoder, comma-separated")
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


def find_weights(name, ckpt=None, fetch=True):
    """Path of the weights file of an encoder (see module docstring); FileNotFoundError says what to get.

    fetch=False looks only on this machine: no request to the Hugging Face hub.
    """
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
    hub_file = _hf_hub_file(name, fetch)
    if hub_file is not None:
        return hub_file
    family = parse_encoder_name(name)[3]
    source = {
        "mocov3": "the MoCo v3 checkpoint from https://github.com/facebookresearch/moco-v3 (CONFIG.md)",
        "clip": "OpenAI CLIP ViT-L/14 (clip.load('ViT-L/14') downloads it there)",
    }.get(family, url)
    repo = hf_repo(name)
    if repo is None:
        hub = ""
    elif hub_offline():
        hub = f" The timm copy on the Hugging Face hub ({repo}) is fetched when HF_HUB_OFFLINE is unset."
    else:
        hub = f" The timm copy on the Hugging Face hub ({repo}) is not in the cache and could not be fetched."
    raise FileNotFoundError(
        f"no weights for encoder {name}. Get {source} and save it as {files[0].absolute()}, or pass its path with "
        f"--enc-ckpt / set {variable}.{hub} Looked in: {', '.join(str(f.absolute()) for f in files)}. "
        f"For a smoke run without weights pass --enc-random-init."
    )


def hf_repo(name):
    """Hugging Face hub repository of timm's copy of the encoder weights, or None."""
    _, _, model_config, family = parse_encoder_name(name)
    if family not in PRETRAINED_TAGS:
        return None
    return _pretrained_cfg(family, model_config).hf_hub_id or None


def _hf_hub_file(name, fetch=True):
    """timm's copy of the encoder weights: from the Hugging Face cache, else from the hub if fetch and not offline;
    or None."""
    repo = hf_repo(name)
    if repo is None:
        return None
    for filename in HF_FILENAMES:
        cached = huggingface_hub.try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    if hub_offline() or not fetch:
        return None
    for filename in HF_FILENAMES:
        try:
            # one request without retries first: hf_hub_download alone retries an unreachable hub for a minute
            huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, filename),
                                                 timeout=huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT)
            return Path(huggingface_hub.hf_hub_download(repo, filename))
        except EntryNotFoundError:  # not in that repo: try the next name
            continue
        except Exception:  # hub unreachable or refusing: the next name would fail alike
            return None
    return None


def is_torchscript(path):
    """True if path is a TorchScript archive (torch.jit.save): a zip file with constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _check_torchscript(path, allow_torchscript):
    """True if path is a TorchScript archive; UserError if it is one and not allowed (loading it runs its code)."""
    if not is_torchscript(path):
        return False
    if not allow_torchscript:
        raise UserError(
            f"encoder weights {path} are a TorchScript archive: loading it runs code stored in the file. If you "
            "trust the file, pass --enc-allow-torchscript; or convert it once to a state dict, "
            f"torch.save(torch.jit.load('{path}').state_dict(), 'encoder.pt'), and pass that file")
    return True


def read_weights(path, allow_torchscript=False):
    """State dict (possibly wrapped, as released) from a .pt/.pth/.safetensors file or a TorchScript archive (CLIP).

    A TorchScript archive is refused unless allow_torchscript: torch.jit.load runs code stored in the file.
    """
    if _check_torchscript(path, allow_torchscript):
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    return load_file(path)


def load_weights(encoder, family, path, allow_torchscript=False):
    """Load official-format or timm-format weights into an encoder built by build_encoder (strict)."""
    weights = read_weights(path, allow_torchscript)
    if not isinstance(weights, Mapping):
        raise UserError(f"encoder weights {path} hold a {type(weights).__name__}, not a state dict")
    state_dict = to_timm_state_dict(dict(weights), family, encoder)
    load_state_dict_strict(encoder, state_dict, source=f"encoder weights {path}", flags="--enc-type")
    return encoder
