"""Extract the end-to-end tuned VAE, its latent statistics and the discriminator from a REPA-E checkpoint.

    python save_vae_weights.py --repae-ckpt EXP/checkpoints/0400000.pt --vae-name e2e-vae --save-dir exps

writes SAVE_DIR/NAME/NAME.pt (the VAE state dict), NAME-latents-stats.pt
({"latents_scale", "latents_bias"}, each (1, C, 1, 1), from the EMA SiT's batch-norm: scale = running_var^-1/2,
bias = running_mean) and NAME-discriminator-ckpt.pt; with --diffusers also a diffusers AutoencoderKL folder
SAVE_DIR/NAME/diffusers. A run of train_repae.py --vae diffusers (any diffusers AutoencoderKL) is always written as
SAVE_DIR/NAME/diffusers, an AutoencoderKL folder of the run's own config (its scaling_factor and shift_factor kept,
the statistics added as latents_mean/latents_std and latents_stats.pt), instead of NAME.pt.
Existing outputs are kept unless --overwrite is given.
"""
import argparse
from collections.abc import Mapping
from pathlib import Path

from utils.cli import HelpFormatter
from utils.errors import UserError, report_user_errors


def build_parser():
    """The export flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--repae-ckpt", type=str, required=True,
                        help="REPA-E training checkpoint (EXP/checkpoints/N.pt, or a hub id: REPA-E/sit-repae-vavae)")
    parser.add_argument("--vae-name", type=str, default="e2e-vae", help="name of the saved VAE")
    parser.add_argument("--save-dir", type=str, default="exps", help="outputs go to SAVE_DIR/VAE_NAME/")
    parser.add_argument("--diffusers", action="store_true",
                        help="also export a diffusers AutoencoderKL folder (always done for --vae diffusers runs)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    return parser


def read_training_checkpoint(spec):
    """(checkpoint, kind of its VAE) of a REPA-E training checkpoint; anything else raises UserError naming it."""
    from weights.checkpoint import check_state_dict, load_file
    from weights.hub import resolve_weights
    from weights.vae import checkpoint_vae_kind

    checkpoint = load_file(resolve_weights(spec))
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{spec} holds a {type(checkpoint).__name__}, not a REPA-E training checkpoint")
    for key in ("vae", "ema"):
        if key not in checkpoint:
            raise UserError(f"{spec} has no '{key}' entry: it is not a REPA-E training checkpoint (keys "
                            f"{', '.join(map(str, list(checkpoint)[:8]))}); pass EXP/checkpoints/STEP.pt of a "
                            "train_repae.py run")
    check_state_dict(checkpoint["vae"], f"{spec} [vae]", "VAE")
    check_state_dict(checkpoint["ema"], f"{spec} [ema]", "SiT")
    if not {"bn.running_mean", "bn.running_var"} <= checkpoint["ema"].keys():
        raise UserError(f"{spec} [ema] has no latent batch-norm (bn.running_mean, bn.running_var): it is not a "
                        "REPA-E training checkpoint")
    return checkpoint, checkpoint_vae_kind(checkpoint, spec)


def main(argv=None):
    """Write the outputs; return their paths by kind (vae, latents_stats, discriminator, diffusers)."""
    args = build_parser().parse_args(argv)
    from weights.checkpoint import atomic_save
    from weights.hub import DISCRIMINATOR_SUFFIX, STATS_SUFFIX
    from weights.latent_stats import stats_from_batchnorm

    checkpoint, kind = read_training_checkpoint(args.repae_ckpt)
    out_dir = Path(args.save_dir) / args.vae_name
    outputs = {"latents_stats": out_dir / f"{args.vae_name}{STATS_SUFFIX}",
               **kind.export_outputs(out_dir, args.vae_name, args.diffusers)}
    if "discriminator" in checkpoint:
        outputs["discriminator"] = out_dir / f"{args.vae_name}{DISCRIMINATOR_SUFFIX}"
    existing = [str(path) for path in outputs.values() if path.exists()]
    if existing and not args.overwrite:
        raise UserError(f"refusing to overwrite {', '.join(existing)}: pass --overwrite")

    stats = stats_from_batchnorm(checkpoint["ema"]["bn.running_mean"], checkpoint["ema"]["bn.running_var"])
    atomic_save(stats, outputs["latents_stats"])
    if "discriminator" in outputs:
        atomic_save(checkpoint["discriminator"], outputs["discriminator"])
    kind.export(checkpoint, stats, outputs, args.repae_ckpt)
    for name, path in outputs.items():
        print(f"saved {name}: {path}")
    return outputs


if __name__ == "__main__":
    report_user_errors(main)()
