"""Extract the end-to-end tuned VAE, its latent statistics and the discriminator from a REPA-E checkpoint.

    python save_vae_weights.py --repae-ckpt EXP/checkpoints/0400000.pt --vae-name e2e-vae --save-dir exps

writes SAVE_DIR/NAME/NAME.pt (the VAE state dict), NAME-latents-stats.pt
({"latents_scale", "latents_bias"}, each (1, C, 1, 1), from the EMA SiT's batch-norm: scale = running_var^-1/2,
bias = running_mean) and NAME-discriminator-ckpt.pt; with --diffusers also a diffusers AutoencoderKL folder
SAVE_DIR/NAME/diffusers. Existing outputs are kept unless --overwrite is given.
"""
import argparse
from pathlib import Path

from models.autoencoder import vae_arch_of, vae_models
from utils.checkpoint import atomic_save, load_file, load_state_dict_strict
from utils.files import atomic_write
from utils.hub import DISCRIMINATOR_SUFFIX, STATS_SUFFIX, resolve_weights
from utils.latents import stats_from_batchnorm


def parse_args(argv=None):
    """Parse the export flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repae-ckpt", type=str, required=True,
                        help="REPA-E training checkpoint (EXP/checkpoints/N.pt, or a hub id: REPA-E/sit-repae-vavae)")
    parser.add_argument("--vae-name", type=str, default="e2e-vae", help="name of the saved VAE")
    parser.add_argument("--save-dir", type=str, default="exps", help="outputs go to SAVE_DIR/VAE_NAME/")
    parser.add_argument("--diffusers", action="store_true", help="also export a diffusers AutoencoderKL folder")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    return parser.parse_args(argv)


def export_diffusers(vae_state, arch, stats, folder, source):
    """Write the diffusers folder all at once, so no half-written folder is left behind."""
    from utils.diffusers_vae import export_diffusers_vae

    vae = vae_models[arch]()
    load_state_dict_strict(vae, vae_state, f"{source} [vae]")
    with atomic_write(folder, folder=True) as tmp:
        export_diffusers_vae(vae, arch, tmp, stats)


def main(argv=None):
    """Write the outputs; return their paths by kind (vae, latents_stats, discriminator, diffusers)."""
    args = parse_args(argv)
    checkpoint = load_file(resolve_weights(args.repae_ckpt))
    for key in ("vae", "ema"):
        if key not in checkpoint:
            raise SystemExit(f"{args.repae_ckpt} has no '{key}' entry: it is not a REPA-E training checkpoint")
    arch = vae_arch_of(checkpoint["vae"])
    if arch is None:
        raise ValueError(f"{args.repae_ckpt} [vae] fits none of the autoencoder layouts {', '.join(vae_models)}")

    out_dir = Path(args.save_dir) / args.vae_name
    outputs = {"vae": out_dir / f"{args.vae_name}.pt", "latents_stats": out_dir / f"{args.vae_name}{STATS_SUFFIX}"}
    if "discriminator" in checkpoint:
        outputs["discriminator"] = out_dir / f"{args.vae_name}{DISCRIMINATOR_SUFFIX}"
    if args.diffusers:
        outputs["diffusers"] = out_dir / "diffusers"
    existing = [str(path) for path in outputs.values() if path.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"refusing to overwrite {', '.join(existing)}: pass --overwrite")

    stats = stats_from_batchnorm(checkpoint["ema"]["bn.running_mean"], checkpoint["ema"]["bn.running_var"])
    atomic_save(checkpoint["vae"], outputs["vae"])
    atomic_save(stats, outputs["latents_stats"])
    if "discriminator" in outputs:
        atomic_save(checkpoint["discriminator"], outputs["discriminator"])
    if args.diffusers:
        export_diffusers(checkpoint["vae"], arch, stats, outputs["diffusers"], args.repae_ckpt)
    for kind, path in outputs.items():
        print(f"saved {kind}: {path}")
    return outputs


if __name__ == "__main__":
    main()
