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


def parse_args(argv=None):
    """Parse the export flags."""
    return build_parser().parse_args(argv)


def export_diffusers(checkpoint, arch, stats, folder, source):
    """Write the diffusers folder all at once, so no half-written folder is left behind."""
    from models.autoencoder import DIFFUSERS_VAE
    from utils.diffusers_vae import export_diffusers_autoencoder, export_diffusers_vae
    from utils.files import atomic_write
    from utils.latents import VAE_CONFIG_KEY, vae_from_checkpoint

    with atomic_write(folder, folder=True) as tmp:
        if arch == DIFFUSERS_VAE:
            export_diffusers_autoencoder(checkpoint["vae"], checkpoint[VAE_CONFIG_KEY], tmp, stats, f"{source} [vae]")
        else:
            export_diffusers_vae(vae_from_checkpoint(arch, checkpoint, source), arch, tmp, stats)


def read_training_checkpoint(spec):
    """(checkpoint, VAE layout name or 'diffusers') of a REPA-E training checkpoint; anything else raises UserError
    naming it."""
    from models.autoencoder import DIFFUSERS_VAE, vae_arch_of, vae_models
    from utils.checkpoint import check_state_dict, load_file
    from utils.hub import resolve_weights
    from utils.latents import VAE_CONFIG_KEY

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
    if isinstance(checkpoint.get(VAE_CONFIG_KEY), Mapping):  # a --vae diffusers run: the config is the layout
        return checkpoint, DIFFUSERS_VAE
    arch = vae_arch_of(checkpoint["vae"])
    if arch is None:
        raise UserError(f"{spec} [vae] fits none of the autoencoder layouts {', '.join(vae_models)}")
    return checkpoint, arch


def main(argv=None):
    """Write the outputs; return their paths by kind (vae, latents_stats, discriminator, diffusers)."""
    args = parse_args(argv)
    from models.autoencoder import DIFFUSERS_VAE
    from utils.checkpoint import atomic_save
    from utils.hub import DISCRIMINATOR_SUFFIX, STATS_SUFFIX
    from utils.latents import stats_from_batchnorm

    checkpoint, arch = read_training_checkpoint(args.repae_ckpt)
    out_dir = Path(args.save_dir) / args.vae_name
    outputs = {"latents_stats": out_dir / f"{args.vae_name}{STATS_SUFFIX}"}
    if arch != DIFFUSERS_VAE:  # a diffusers VAE's weights mean nothing without its config: the folder holds both
        outputs["vae"] = out_dir / f"{args.vae_name}.pt"
    if "discriminator" in checkpoint:
        outputs["discriminator"] = out_dir / f"{args.vae_name}{DISCRIMINATOR_SUFFIX}"
    if args.diffusers or arch == DIFFUSERS_VAE:
        outputs["diffusers"] = out_dir / "diffusers"
    existing = [str(path) for path in outputs.values() if path.exists()]
    if existing and not args.overwrite:
        raise UserError(f"refusing to overwrite {', '.join(existing)}: pass --overwrite")

    stats = stats_from_batchnorm(checkpoint["ema"]["bn.running_mean"], checkpoint["ema"]["bn.running_var"])
    if "vae" in outputs:
        atomic_save(checkpoint["vae"], outputs["vae"])
    atomic_save(stats, outputs["latents_stats"])
    if "discriminator" in outputs:
        atomic_save(checkpoint["discriminator"], outputs["discriminator"])
    if "diffusers" in outputs:
        export_diffusers(checkpoint, arch, stats, outputs["diffusers"], args.repae_ckpt)
    for kind, path in outputs.items():
        print(f"saved {kind}: {path}")
    return outputs


if __name__ == "__main__":
    report_user_errors(main)()
