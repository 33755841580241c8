"""Command-line flags both trainers read (published names, types and defaults) and their checks.

Importing this module imports no torch, so that `--help` and flag errors answer at once.
"""
import argparse

from evaluation.flags import add_dinov2_flags, add_inception_flags, metric_list
from utils.cli import (
    VAE_CKPT_HELP,
    HelpFormatter,
    below_one_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    unit_float,
    vae_kind_help,
)
from utils.errors import UserError

# What the trainers score their samples with during training: the ADM numbers and FD-DINOv2 (precision and recall
# would need every reference image's features at each evaluation).
TRAINING_METRICS = ["is", "fid", "sfid", "fd_dinov2"]


def training_parser(description, *, trainer, model_default, vae_default, vae_ckpt_default):
    """An argument parser with the flags both training scripts take, defaults shown in --help; the parsed flags
    record `trainer` (the script), which owns the experiment folders it writes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.set_defaults(trainer=trainer)
    bool_flag = argparse.BooleanOptionalAction

    run = parser.add_argument_group("experiment")
    run.add_argument("--output-dir", type=str, default="exps", help="experiments go to OUTPUT_DIR/EXP_NAME")
    run.add_argument("--exp-name", type=str, required=True, help="name of the experiment folder")
    run.add_argument("--logging-dir", type=str, default="logs",
                     help="tracker files go to OUTPUT_DIR/LOGGING_DIR/EXP_NAME")
    run.add_argument("--report-to", type=str, default="wandb", help="wandb, tensorboard, both (comma) or none")
    run.add_argument("--sampling-steps", type=positive_int, default=10000, help="write EMA sample grids every N steps")
    run.add_argument("--checkpointing-steps", type=positive_int, default=50000, help="write a checkpoint every N steps")
    run.add_argument("--log-every", type=positive_int, default=1,
                     help="send metrics to the progress bar and the trackers every N steps")
    run.add_argument("--sample-batch-size", type=positive_int, default=64, help="images in each sample grid")
    run.add_argument("--keep-last-checkpoints", type=non_negative_int, default=0,
                     help="keep only the newest N checkpoints (0 keeps all)")
    run.add_argument("--resume-step", type=non_negative_int, default=0,
                     help="resume from checkpoint N of this experiment (or of --continue-train-exp-dir)")
    run.add_argument("--continue-train-exp-dir", type=str, default=None,
                     help="experiment folder whose checkpoint --resume-step names")
    run.add_argument("--resume-latest", action="store_true",
                     help="resume from the newest readable checkpoint of this experiment, if any")
    run.add_argument("--wandb-history-path", type=str, default=None,
                     help="accepted so that published command lines run; not used")

    model = parser.add_argument_group("model")
    model.add_argument("--model", type=str, default=model_default,
                       help="SiT-{S,B,L,XL}/{1,2,4,8}; SiT-T/* and SiT-P/* are smoke-run sizes")
    model.add_argument("--num-classes", type=positive_int, default=1000,
                       help="class labels (the null label is this number)")
    model.add_argument("--cfg-prob", type=unit_float, default=0.1, help="probability of dropping a label (for CFG)")
    model.add_argument("--encoder-depth", type=positive_int, default=8, help="SiT block whose features REPA aligns")
    model.add_argument("--qk-norm", action=bool_flag, default=False, help="layer-norm queries and keys")
    model.add_argument("--fused-attn", action=bool_flag, default=True, help="scaled-dot-product attention kernel")
    model.add_argument("--compile", action=bool_flag, default=True, help="torch.compile the trained networks")
    model.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute activations in the backward (SiT blocks, VAE residual blocks): less memory, "
                            "about a third more compute, the same numbers")
    model.add_argument("--vae", type=str, default=vae_default, help=vae_kind_help("--vae-ckpt"))
    model.add_argument("--vae-ckpt", type=str, default=vae_ckpt_default, help=f"{VAE_CKPT_HELP}; none: a random VAE")
    model.add_argument("--enc-type", type=str, default="dinov2-vit-b",
                       help="frozen encoder(s) REPA aligns to, comma-separated, e.g. dinov2-vit-b")
    model.add_argument("--enc-ckpt", type=str, default=None,
                       help="encoder weights (official or timm format): path or hub id, comma-separated per encoder")
    model.add_argument("--enc-random-init", action="store_true", help="random-weight encoders (smoke runs only)")
    model.add_argument("--enc-allow-torchscript", action="store_true",
                       help="allow encoder weights in TorchScript form (the CLIP file); loading one runs its code")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=str, default="data", help="folder with images.h5 (preprocessing.py)")
    data.add_argument("--resolution", type=positive_int, default=256, help="image side in pixels; must match images.h5")
    data.add_argument("--batch-size", type=positive_int, default=256,
                      help="global batch size over all processes (each process gets an equal share)")
    data.add_argument("--num-workers", type=non_negative_int, default=4, help="data loader workers per process")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--allow-tf32", action=bool_flag, default=True, help="TF32 matmuls on GPUs")
    optim.add_argument("--mixed-precision", type=str, default="fp16", choices=["no", "fp16", "bf16"],
                       help="autocast dtype (fp16 with a gradient scaler; on CPU too)")
    optim.add_argument("--epochs", type=positive_int, default=1400, help="stop after this many epochs at most")
    optim.add_argument("--max-train-steps", type=positive_int, default=400000, help="optimization steps of the run")
    optim.add_argument("--gradient-accumulation-steps", type=positive_int, default=1, help="micro-batches per step")
    optim.add_argument("--learning-rate", type=positive_float, default=1e-4, help="SiT AdamW learning rate")
    optim.add_argument("--adam-beta1", type=below_one_float, default=0.9, help="AdamW beta1 (every optimizer)")
    optim.add_argument("--adam-beta2", type=below_one_float, default=0.999, help="AdamW beta2 (every optimizer)")
    optim.add_argument("--adam-weight-decay", type=non_negative_float, default=0.0,
                       help="AdamW weight decay (every optimizer)")
    optim.add_argument("--adam-epsilon", type=positive_float, default=1e-08, help="AdamW epsilon (every optimizer)")
    optim.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="gradient clipping (every update)")
    optim.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise")
    optim.add_argument("--max-nonfinite-steps", type=positive_int, default=50,
                       help="stop after this many consecutive steps with a non-finite loss or gradient")
    optim.add_argument("--ema-decay", type=unit_float, default=0.9999, help="EMA decay of the SiT (short runs: 0.99)")

    loss = parser.add_argument_group("diffusion loss")
    loss.add_argument("--path-type", type=str, default="linear", choices=["linear", "cosine"],
                      help="interpolant between data and noise")
    loss.add_argument("--prediction", type=str, default="v", choices=["v"], help="what the SiT predicts")
    loss.add_argument("--weighting", type=str, default="uniform", choices=["uniform", "lognormal"],
                      help="distribution of training times")
    loss.add_argument("--proj-coeff", type=non_negative_float, default=0.5,
                      help="weight of the REPA loss in the SiT update")

    evaluation = parser.add_argument_group(
        "evaluation during training", "the EMA SiT's samples scored as generate.py + evaluate.py score them (and, by "
        "train_repae.py, the VAE's reconstructions as eval_vae.py does); numbers in EXP/eval.jsonl and the trackers")
    evaluation.add_argument("--eval-every", type=non_negative_int, default=0,
                            help="evaluate every N steps and at the end of the run (0: never, as published)")
    evaluation.add_argument("--eval-num-samples", type=positive_int, default=10_000,
                            help="K: images sampled per evaluation (train_repae.py also reconstructs the first K "
                                 "training images)")
    evaluation.add_argument("--eval-ref", type=str, default=None,
                            help="reference: the statistics file reference_stats.py writes, or an ADM reference batch")
    evaluation.add_argument("--eval-sampler", type=str, default="ode", choices=["ode", "sde"],
                            help="generate.py's --mode")
    evaluation.add_argument("--eval-steps", type=positive_int, default=50, help="generate.py's --num-steps")
    evaluation.add_argument("--eval-cfg-scale", type=float, default=1.5, help="generate.py's --cfg-scale")
    evaluation.add_argument("--eval-batch-size", type=positive_int, default=256,
                            help="images per sampler batch: the samples are those of one generate.py process with "
                                 "this --pproc-batch-size, on any number of training processes")
    evaluation.add_argument("--eval-seed", type=int, default=0, help="generate.py's --global-seed")
    evaluation.add_argument("--eval-metrics", type=metric_list(TRAINING_METRICS), default=None,
                            help=f"comma list of {', '.join(TRAINING_METRICS)} (default: all whose weights are on this "
                                 "machine)")
    add_inception_flags(evaluation, "IS, FID and sFID (and rFID) are")
    add_dinov2_flags(evaluation)
    return parser


def generation_eval_settings(args):
    """The settings of training.evaluator.GenerationEvaluator that the --eval-* flags give."""
    return dict(reference=args.eval_ref, resolution=args.resolution, num_samples=args.eval_num_samples,
                batch_size=args.eval_batch_size, seed=args.eval_seed, sampler=args.eval_sampler,
                num_steps=args.eval_steps, cfg_scale=args.eval_cfg_scale, metrics=args.eval_metrics,
                inception_weights=args.inception_weights, inception_random_init=args.inception_random_init,
                dinov2_weights=args.dinov2_weights, dinov2_random_init=args.dinov2_random_init)


def check_training_args(args):
    """Reject inconsistent flags, naming the flag; imports the model registries (torch) only now."""
    from models.autoencoder import check_image_size
    from models.sit import SiT_models
    from weights.vae import resolve_vae

    if args.model not in SiT_models:
        raise UserError(f"--model {args.model}: unknown; choose one of {', '.join(SiT_models)}")
    vae = resolve_vae(args.vae, args.vae_ckpt)  # the layout only (--vae diffusers: its folder's config)
    check_image_size((args.resolution, args.resolution), vae.downsample_factor(), f"--vae {args.vae}")
    depth = SiT_models[args.model].keywords["depth"]
    if args.encoder_depth > depth:
        raise UserError(f"--encoder-depth {args.encoder_depth}: {args.model} has {depth} blocks; pass 1 to {depth}")
    if args.eval_every and args.eval_ref is None:
        raise UserError(f"--eval-every {args.eval_every} needs --eval-ref: the statistics file reference_stats.py "
                        "writes (or an ADM reference batch) of images at --resolution")
    if args.mixed_precision == "fp16" and args.gradient_accumulation_steps > 1:
        # The optimizers share one gradient scaler whose scale may change between their updates.
        raise UserError("--gradient-accumulation-steps > 1 needs --mixed-precision bf16 or no (not fp16)")
    return args
