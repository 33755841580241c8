"""Flags the evaluation scripts share. Importing this module imports no torch."""
import argparse

from utils.cli import VAE_CKPT_HELP, vae_kind_help
from utils.errors import UserError

# The --metrics names, in the order the results are reported, and what each is.
METRICS = {
    "is": "Inception Score",
    "fid": "FID (Inception pool_3, 2048-d)",
    "sfid": "sFID (Inception mixed_6/conv, 2023-d)",
    "precision": "precision (k=3 manifolds of pool_3; needs the reference images)",
    "recall": "recall (idem)",
    "fd_dinov2": "FD-DINOv2 (edm2's Frechet distance of DINOv2 ViT-L/14 class tokens, 1024-d)",
}


def add_vae_eval_flags(parser):
    """--vae, --vae-ckpt (one or several VAEs) and --data-dir, as the VAE evaluation scripts take them."""
    parser.add_argument("--vae", type=str, default="f8d4", help=vae_kind_help("--vae-ckpt"))
    parser.add_argument("--vae-ckpt", type=str, nargs="+", required=True,
                        help=f"one or more VAEs: {VAE_CKPT_HELP}; none: a random VAE (smoke runs)")
    parser.add_argument("--data-dir", type=str, default="data", help="folder holding images.h5 (preprocessing.py)")


def add_inception_flags(parser, metrics):
    """--inception-weights and --inception-random-init; `metrics` names what the network scores in the help."""
    parser.add_argument("--inception-weights", type=str, default=None,
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: "
                             "$REPAE_INCEPTION_WEIGHTS, else $TORCH_HOME/hub/checkpoints/)")
    parser.add_argument("--inception-random-init", action="store_true",
                        help=f"random Inception weights: {metrics} then only a smoke test")


def add_dinov2_flags(parser):
    """--dinov2-weights and --dinov2-random-init (the FD-DINOv2 network)."""
    parser.add_argument("--dinov2-weights", type=str, default=None,
                        help="the official dinov2_vitl14_pretrain.pth or timm's copy (default: "
                             "$REPAE_ENCODER_CKPT_DINOV2_VIT_L, else $TORCH_HOME/hub/checkpoints/, else the Hugging "
                             "Face cache of timm/vit_large_patch14_dinov2.lvd142m)")
    parser.add_argument("--dinov2-random-init", action="store_true",
                        help="random DINOv2 weights: FD-DINOv2 is then only a smoke test")


def metric_list(names):
    """The metrics named by a comma list, returned as a list in their report order.

    The argparse type of --metrics; `names` are those the script offers."""
    def parse(text):
        wanted = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in names]
        if unknown or not wanted:
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma list of {', '.join(names)}")
        return [name for name in names if name in wanted]
    parse.__name__ = "metric list"
    return parse


def add_metrics_flag(parser, names, default_help):
    """--metrics: a comma list of `names` (keys of METRICS), None when not given; default_help says what that does."""
    described = "; ".join(f"{name}: {METRICS[name]}" for name in names)
    parser.add_argument("--metrics", type=metric_list(names), default=None,
                        help=f"comma list of metrics ({described}); default: {default_help}")


def add_device_flag(parser):
    """--device."""
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")


def add_output_flags(parser):
    """--device and --json."""
    add_device_flag(parser)
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")


def resolve_device(device):
    """The --device to run on: as given (UserError when it names CUDA and there is none), else cuda when available."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device}: not a device; pass cuda or cpu") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; pass --device cpu")
    return device
