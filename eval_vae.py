"""Reconstruction quality and latent statistics of one or several VAEs on DATA/images.h5, as one table.

    python eval_vae.py --vae f8d4 --vae-ckpt REPA-E/sdvae REPA-E/e2e-sdvae --data-dir data --num-images 50000

Each image is encoded to its posterior mean and decoded (as the published code decodes); the reconstruction is
turned into uint8 pixels as generate.py saves samples, and compared with the original: PSNR and SSIM (torchmetrics,
11x11 Gaussian window) on the 0..255 pixels, LPIPS-VGG (the `lpips` package) on [-1, 1] images, and rFID, the ADM
evaluator's FID of the reconstructions against the originals with the same Inception features as evaluate.py.
Also reported: the mean and standard deviation of every latent channel over all images and positions.
--vae-ckpt takes every form the project loads: NAME.pt, .safetensors, a diffusers folder or a hub id.
"""
import argparse

from evaluation.flags import add_inception_flags, add_output_flags, add_vae_eval_flags, resolve_device
from utils.cli import HelpFormatter, non_negative_int, positive_int
from utils.errors import report_user_errors

METRICS = (("PSNR", "psnr"), ("SSIM", "ssim"), ("LPIPS", "lpips"), ("rFID", "rfid"))


def build_parser():
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_vae_eval_flags(parser)
    parser.add_argument("--num-images", type=positive_int, default=None,
                        help="evaluate the first N images (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE forward")
    parser.add_argument("--num-workers", type=non_negative_int, default=4, help="DataLoader workers")
    add_output_flags(parser)
    parser.add_argument("--rfid", action=argparse.BooleanOptionalAction, default=True,
                        help="compute rFID (needs the Inception weights; its 2048x2048 matrix square root takes "
                             "about a minute on a small CPU)")
    add_inception_flags(parser, "rFID is")
    parser.add_argument("--lpips-random-init", action="store_true",
                        help="random LPIPS VGG trunk: LPIPS is then only a smoke test")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random VAE ('none')")
    return parser


def run(args):
    """Evaluate every --vae-ckpt; returns {ckpt: results}."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from dataset.h5 import ImageDataset
    from evaluation.inception import build_inception
    from evaluation.metrics import fid_statistics, frechet_distance
    from evaluation.reconstruction import evaluate_vae, original_features
    from loss.lpips import build_lpips
    from weights.vae import load_vaes

    device = resolve_device(args.device)
    dataset = ImageDataset(args.data_dir)
    vaes = load_vaes(args.vae, args.vae_ckpt, dataset.image_size, args.seed)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full float32 metrics
    count = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    loader = DataLoader(Subset(dataset, range(count)), batch_size=args.batch_size, num_workers=args.num_workers)
    torch.manual_seed(args.seed)  # a random LPIPS trunk is the same in every run
    lpips = build_lpips(pretrained_trunk=not args.lpips_random_init).to(device)
    inception = build_inception(args.inception_weights, args.inception_random_init, device,
                                other_ways_out=["--no-rfid (no rFID)"]) if args.rfid else None
    reference = fid_statistics(original_features(inception, loader)) if args.rfid else None
    results = {}
    for ckpt, vae in vaes.items():
        print(f"{ckpt}:")
        metrics, pool = evaluate_vae(vae.to(device), loader, device, lpips, inception)
        vae.cpu()
        metrics["rfid"] = frechet_distance(*fid_statistics(pool), *reference) if args.rfid else None
        metrics["num_images"] = count
        results[ckpt] = metrics
    return results


def format_table(results):
    """The results as a text table (one row per VAE) followed by each VAE's latent channel statistics."""
    width = max(len("VAE"), *(len(name) for name in results))
    lines = [f"{'VAE':<{width}}" + "".join(f"{title:>10}" for title, _ in METRICS)]
    for name, metrics in results.items():
        values = ["-" if metrics[key] is None else f"{metrics[key]:.4f}" for _, key in METRICS]
        lines.append(f"{name:<{width}}" + "".join(f"{value:>10}" for value in values))
    lines.append("latent channels (posterior mean over all images and positions):")
    for name, metrics in results.items():
        lines.append(f"{name}: mean " + " ".join(f"{v:+.3f}" for v in metrics["latent_mean"]))
        lines.append(f"{' ' * len(name)}  std  " + " ".join(f"{v:.3f}".rjust(6) for v in metrics["latent_std"]))
    return "\n".join(lines)


def main(argv=None):
    """Parse flags, evaluate every VAE, print the table, write --json; returns {ckpt: results}."""
    args = build_parser().parse_args(argv)
    from evaluation.report import report_results

    results = run(args)
    smoke_tests = (["random Inception weights: rFID is"] if args.inception_random_init and args.rfid else []) + \
        (["random LPIPS trunk: LPIPS is"] if args.lpips_random_init else [])
    report_results(format_table(results), results, json_path=args.json, smoke_tests=smoke_tests)
    return results


if __name__ == "__main__":
    report_user_errors(main)()
