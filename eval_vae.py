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
import sys

from utils.cli import HelpFormatter, add_vae_eval_flags
from utils.errors import report_user_errors

METRICS = (("PSNR", "psnr"), ("SSIM", "ssim"), ("LPIPS", "lpips"), ("rFID", "rfid"))


def build_parser():
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_vae_eval_flags(parser)
    parser.add_argument("--num-images", type=int, default=None, help="evaluate the first N images (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE forward")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    parser.add_argument("--rfid", action=argparse.BooleanOptionalAction, default=True,
                        help="compute rFID (needs the Inception weights; its 2048x2048 matrix square root takes "
                             "about a minute on a small CPU)")
    parser.add_argument("--inception-weights", type=str, default=None,
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: "
                             "$REPAE_INCEPTION_WEIGHTS, else $TORCH_HOME/hub/checkpoints/)")
    parser.add_argument("--inception-random-init", action="store_true",
                        help="random Inception weights: rFID is then only a smoke test")
    parser.add_argument("--lpips-random-init", action="store_true",
                        help="random LPIPS VGG trunk: LPIPS is then only a smoke test")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random VAE ('none')")
    return parser


def parse_args(argv=None):
    """Parse and check the command-line flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or (args.num_images is not None and args.num_images <= 0):
        parser.error("--batch-size and --num-images must be positive")
    return args


def to_uint8(images):
    """Decoded images in [-1, 1] -> uint8 (B, 3, H, W), truncating as generate.py does."""
    import torch

    return torch.clamp(255.0 * (images + 1) / 2, 0, 255).to(torch.uint8)


def psnr(reconstructions, originals):
    """Per-image PSNR in dB of uint8 images (B, 3, H, W)."""
    mse = (reconstructions.double() - originals.double()).pow(2).mean(dim=(1, 2, 3))
    return 10 * (255.0 ** 2 / mse).log10()


class LatentMoments:
    """Running per-channel mean and standard deviation of latents (B, C, h, w) over images and positions."""

    def __init__(self):
        self.total, self.total_sq, self.count = 0.0, 0.0, 0

    def update(self, z):
        """Add a batch of latents."""
        z = z.double()
        self.total = self.total + z.sum(dim=(0, 2, 3)).cpu()
        self.total_sq = self.total_sq + z.pow(2).sum(dim=(0, 2, 3)).cpu()
        self.count += z.numel() // z.shape[1]

    def mean_std(self):
        """(mean, std) lists, one value per channel."""
        mean = self.total / self.count
        std = (self.total_sq / self.count - mean.pow(2)).clamp_min(0).sqrt()
        return mean.tolist(), std.tolist()


def evaluate_vae(vae, loader, device, lpips, inception):
    """Reconstruct every batch of uint8 images; returns (metrics dict, reconstruction pool features or None)."""
    import numpy as np
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure
    from tqdm import tqdm

    from utils.latents import preprocess_imgs_vae

    psnrs, ssims, lpipses, pools, moments = [], [], [], [], LatentMoments()
    with torch.no_grad():
        for images, _ in tqdm(loader, desc="reconstructing", unit="batch"):
            images = images.to(device)
            inputs = preprocess_imgs_vae(images)
            z = vae.encode(inputs).mode()
            reconstructions = to_uint8(vae.decode(z).float())
            moments.update(z)
            psnrs.append(psnr(reconstructions, images).cpu())
            ssims.append(structural_similarity_index_measure(
                reconstructions.float(), images.float(), data_range=255.0, reduction="none").cpu())
            lpipses.append(lpips(preprocess_imgs_vae(reconstructions), inputs).flatten().cpu())
            if inception is not None:
                pools.append(inception.activations(reconstructions.permute(0, 2, 3, 1))[0])
    mean, std = moments.mean_std()
    metrics = {"psnr": torch.cat(psnrs).mean().item(), "ssim": torch.cat(ssims).mean().item(),
               "lpips": torch.cat(lpipses).mean().item(), "latent_mean": mean, "latent_std": std}
    return metrics, (np.concatenate(pools) if pools else None)


def original_features(inception, loader):
    """Pool features of the original images."""
    import numpy as np
    from tqdm import tqdm

    return np.concatenate([inception.activations(images.permute(0, 2, 3, 1))[0]
                           for images, _ in tqdm(loader, desc="original images", unit="batch")])


def run(args):
    """Evaluate every --vae-ckpt; returns {ckpt: results}."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from loss.lpips import build_lpips
    from utils.data import ImageDataset
    from utils.evaluation import build_inception, fid_statistics, frechet_distance, load_vaes

    dataset = ImageDataset(args.data_dir)
    vaes = load_vaes(args.vae, args.vae_ckpt, dataset.image_size, args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full float32 metrics
    count = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    loader = DataLoader(Subset(dataset, range(count)), batch_size=args.batch_size, num_workers=args.num_workers)
    torch.manual_seed(args.seed)  # a random LPIPS trunk is the same in every run
    lpips = build_lpips(pretrained_trunk=not args.lpips_random_init).to(device)
    inception = build_inception(args.inception_weights, args.inception_random_init, device) if args.rfid else None
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
    args = parse_args(argv)
    results = run(args)
    print(format_table(results))
    if args.inception_random_init and args.rfid:
        print("WARNING: random Inception weights: rFID is only a smoke test", file=sys.stderr)
    if args.lpips_random_init:
        print("WARNING: random LPIPS trunk: LPIPS is only a smoke test", file=sys.stderr)
    if args.json:
        from utils.files import write_json

        write_json(args.json, results)
        print(f"Wrote {args.json}")
    return results


if __name__ == "__main__":
    report_user_errors(main)()
