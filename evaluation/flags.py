"""Flags the evaluation scripts share. Importing this module imports no torch."""
from utils.cli import VAE_CKPT_HELP, vae_kind_help
from utils.errors import UserError


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


def add_output_flags(parser):
    """--device and --json."""
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
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
