"""Extract the end-to-end tuned VAE, its latent statistics and the discriminator from a REPA-E checkpoint.

    python save_vae_weights.py --repae-ckpt EXP/checkpoints/0400000.pt --vae-name e2e-vae --save-dir exps

writes, as published, SAVE_DIR/NAME/NAME.pt (the VAE state dict), NAME-latents-stats.pt
({"latents_scale", "latents_bias"}, each (1, C, 1, 1), from the EMA SiT's batch-norm: scale = running_var^-1/2,
bias = running_mean) and NAME-discriminator-ckpt.pt; with --diffusers also a diffusers AutoencoderKL folder
SAVE_DIR/NAME/diffusers. Existing outputs are kept unless --overwrite is given.
"""
import argparse
import os
import shutil
from pathlib import Path

import torch

from models.autoencoder import vae_models
from utils.checkpoint import atomic_save, describe_mismatch, load_file, load_state_dict_strict
from utils.hub import resolve_weights


def parse_args(argv=None):
    """Published flags plus --diffusers and --overwrite."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repae-ckpt", type=str, required=True,
                        help="REPA-E training checkpoint (EXP/checkpoints/N.pt, or a hub id: REPA-E/sit-repae-vavae)")
    parser.add_argument("--vae-name", type=str, default="e2e-vae", help="name of the saved VAE")
    parser.add_argument("--save-dir", type=str, default="exps", help="outputs go to SAVE_DIR/VAE_NAME/")
    parser.add_argument("--diffusers", action="store_true", help="also export a diffusers AutoencoderKL folder")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    return parser.parse_args(argv)


def latents_stats_from_ema(ema_state):
    """The SiT batch-norm as latent statistics: scale = running_var^-1/2, bias = running_mean, each (1, C, 1, 1)."""
    mean, var = ema_state["bn.running_mean"], ema_state["bn.running_var"]
    channels = mean.numel()
    return {"latents_scale": var.rsqrt().view(1, channels, 1, 1), "latents_bias": mean.view(1, channels, 1, 1)}


def vae_arch(vae_state, source):
    """Name of the autoencoder layout that vae_state fits exactly (compared on meta tensors: nothing allocated)."""
    for arch, build in vae_models.items():
        with torch.device("meta"):
            reference = build()
        missing, unexpected, mismatch = describe_mismatch(reference, vae_state)
        if not (missing or unexpected or mismatch):
            return arch
    raise ValueError(f"{source} [vae] fits none of the autoencoder layouts {', '.join(vae_models)}")


def export_diffusers(vae_state, arch, stats, folder, source):
    """Write the diffusers folder beside, then move it into place, so no half-written folder is left behind."""
    from utils.diffusers_vae import export_diffusers_vae

    vae = vae_models[arch]()
    load_state_dict_strict(vae, vae_state, f"{source} [vae]")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_diffusers_vae(vae, arch, tmp, stats)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def main(argv=None):
    """Write the outputs; return their paths by kind (vae, latents_stats, discriminator, diffusers)."""
    args = parse_args(argv)
    checkpoint = load_file(resolve_weights(args.repae_ckpt))
    for key in ("vae", "ema"):
        if key not in checkpoint:
            raise SystemExit(f"{args.repae_ckpt} has no '{key}' entry: it is not a REPA-E training checkpoint")
    arch = vae_arch(checkpoint["vae"], args.repae_ckpt)

    out_dir = Path(args.save_dir) / args.vae_name
    outputs = {"vae": out_dir / f"{args.vae_name}.pt", "latents_stats": out_dir / f"{args.vae_name}-latents-stats.pt"}
    if "discriminator" in checkpoint:
        outputs["discriminator"] = out_dir / f"{args.vae_name}-discriminator-ckpt.pt"
    if args.diffusers:
        outputs["diffusers"] = out_dir / "diffusers"
    existing = [str(path) for path in outputs.values() if path.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"refusing to overwrite {', '.join(existing)}: pass --overwrite")

    stats = latents_stats_from_ema(checkpoint["ema"])
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
