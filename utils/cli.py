"""Command-line flags shared by train_repae.py and train_ldm_only.py (published names, types and defaults)."""
import argparse

import torch

from models.autoencoder import vae_models
from models.sit import SiT_models


def add_training_args(parser, model_default, vae_default, vae_ckpt_default):
    """Add the flags both training scripts take, with the published defaults."""
    bool_flag = argparse.BooleanOptionalAction

    parser.add_argument("--output-dir", type=str, default="exps")
    parser.add_argument("--exp-name", type=str, required=True)
    parser.add_argument("--logging-dir", type=str, default="logs")
    parser.add_argument("--report-to", type=str, default="wandb", help="wandb, tensorboard or none")
    parser.add_argument("--sampling-steps", type=int, default=10000)
    parser.add_argument("--resume-step", type=int, default=0)
    parser.add_argument("--continue-train-exp-dir", type=str, default=None)
    parser.add_argument("--wandb-history-path", type=str, default=None,
                        help="accepted so that published command lines run; not used")

    parser.add_argument("--model", type=str, default=model_default, choices=list(SiT_models))
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--encoder-depth", type=int, default=8)
    parser.add_argument("--qk-norm", action=bool_flag, default=False)
    parser.add_argument("--fused-attn", action=bool_flag, default=True)
    parser.add_argument("--compile", action=bool_flag, default=True)

    parser.add_argument("--data-dir", type=str, default="data")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size over all processes")

    parser.add_argument("--allow-tf32", action=bool_flag, default=True)
    parser.add_argument("--mixed-precision", type=str, default="fp16", choices=["no", "fp16", "bf16"])

    parser.add_argument("--epochs", type=int, default=1400)
    parser.add_argument("--max-train-steps", type=int, default=400000)
    parser.add_argument("--checkpointing-steps", type=int, default=50000)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--adam-beta1", type=float, default=0.9)
    parser.add_argument("--adam-beta2", type=float, default=0.999)
    parser.add_argument("--adam-weight-decay", type=float, default=0.0)
    parser.add_argument("--adam-epsilon", type=float, default=1e-08)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=4)

    parser.add_argument("--path-type", type=str, default="linear", choices=["linear", "cosine"])
    parser.add_argument("--prediction", type=str, default="v", choices=["v"])
    parser.add_argument("--enc-type", type=str, default="dinov2-vit-b")
    parser.add_argument("--proj-coeff", type=float, default=0.5)
    parser.add_argument("--weighting", type=str, default="uniform", choices=["uniform", "lognormal"])
    parser.add_argument("--vae", type=str, default=vae_default, choices=list(vae_models),
                        help="published layouts f8d4, f16d32; the -tiny ones are for smoke runs")
    parser.add_argument("--vae-ckpt", type=str, default=vae_ckpt_default,
                        help="NAME.pt (NAME-latents-stats.pt beside it), .safetensors, diffusers folder, or hub id "
                             "(REPA-E/e2e-vavae, hf://OWNER/NAME/FILE) fetched through the Hugging Face cache")

    # Beyond the published flags: weights for offline machines, resume, guards, sample grids.
    parser.add_argument("--enc-ckpt", type=str, default=None,
                        help="encoder weights (official or timm format): path or hub id")
    parser.add_argument("--enc-random-init", action="store_true",
                        help="random-weight encoders, for smoke runs only")
    parser.add_argument("--resume-latest", action="store_true",
                        help="resume from the newest checkpoint of this experiment, if any")
    parser.add_argument("--keep-last-checkpoints", type=int, default=0,
                        help="keep only the newest N checkpoints (0 keeps all)")
    parser.add_argument("--max-nonfinite-steps", type=int, default=50,
                        help="stop after this many consecutive steps with a non-finite loss or gradient")
    parser.add_argument("--ema-decay", type=float, default=0.9999,
                        help="EMA decay of the SiT (published: 0.9999; short runs want less, e.g. 0.99)")
    parser.add_argument("--sample-batch-size", type=int, default=64,
                        help="images in the sample grid written every --sampling-steps")
    parser.add_argument("--log-every", type=int, default=1,
                        help="send metrics to the progress bar and the trackers every N steps")
    return parser


def validate_training_args(args):
    """Reject inconsistent flags early, naming the flag."""
    with torch.device("meta"):  # the layout only: nothing allocated
        factor = vae_models[args.vae]().downsample_factor
    if args.resolution % factor:
        raise SystemExit(f"--resolution {args.resolution} must be divisible by {factor} for --vae {args.vae}")
    for flag in ("batch_size", "max_train_steps", "checkpointing_steps", "sampling_steps",
                 "gradient_accumulation_steps", "log_every"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be positive")
    return args
