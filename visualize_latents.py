"""Latent-structure pictures (the REPA-E paper's PCA figure): each VAE's latents on their first three principal
components, shown as RGB next to the input image.

    python visualize_latents.py --vae f8d4 --vae-ckpt REPA-E/sdvae REPA-E/e2e-sdvae --data-dir data

One PNG grid: a row per image; columns: the input, then each VAE. Per VAE the components are fitted over all latent
positions (posterior means) of the shown images, so the colours of one column are comparable across its rows;
each component is stretched between its 1st and 99th percentile, and its sign fixed so that reruns agree.
"""
import argparse
from pathlib import Path

from evaluation.flags import add_vae_eval_flags, resolve_device
from utils.cli import HelpFormatter, non_negative_int, positive_int
from utils.errors import UserError, report_user_errors

HEADER_HEIGHT = 14  # a row of column titles above the grid


def build_parser():
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_vae_eval_flags(parser)
    parser.add_argument("--num-images", type=positive_int, default=8, help="rows: this many images")
    parser.add_argument("--start-index", type=non_negative_int, default=0,
                        help="index in images.h5 of the first image shown")
    parser.add_argument("--output", type=str, default="latents_pca.png", help="PNG file to write")
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random VAE ('none')")
    return parser


def pca_rgb(latents):
    """(B, C, h, w) latents -> (B, 3, h, w) in [0, 1]: their first three principal components over all positions."""
    import torch

    batch, channels, height, width = latents.shape
    points = latents.permute(0, 2, 3, 1).reshape(-1, channels).double()
    points = points - points.mean(0)
    components = torch.linalg.svd(points, full_matrices=False).Vh[:3]
    # an SVD leaves each component's sign free: make its largest loading positive
    largest = components.gather(1, components.abs().argmax(1, keepdim=True))
    projections = points @ (components * torch.sign(largest)).T
    low, high = torch.quantile(projections, torch.tensor([0.01, 0.99], dtype=projections.dtype), dim=0)
    rgb = ((projections - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    rgb = torch.cat([rgb, rgb.new_zeros(len(rgb), 3 - rgb.shape[1])], 1)  # fewer than 3 channels: black rest
    return rgb.reshape(batch, height, width, 3).permute(0, 3, 1, 2).float()


def latent_pictures(vae, images, device):
    """uint8 (B, 3, H, W) images -> uint8 (B, 3, H, W) PCA pictures of their latents, upsampled (nearest)."""
    import torch
    import torch.nn.functional as F

    from models.autoencoder import preprocess_imgs_vae

    with torch.no_grad():
        latents = vae.encode(preprocess_imgs_vae(images.to(device))).mode()
    pictures = F.interpolate(pca_rgb(latents.cpu()), size=images.shape[-2:], mode="nearest")
    return (pictures * 255).round().to(torch.uint8)


def grid_image(columns, titles):
    """PIL image of equally sized uint8 (B, 3, H, W) columns side by side, a title above each."""
    import numpy as np
    from PIL import Image, ImageDraw

    tiles = np.concatenate([column.permute(0, 2, 3, 1).numpy() for column in columns], axis=2)  # (B, H, W*k, 3)
    body = tiles.reshape(-1, *tiles.shape[2:])
    grid = Image.new("RGB", (body.shape[1], body.shape[0] + HEADER_HEIGHT), "white")
    grid.paste(Image.fromarray(body), (0, HEADER_HEIGHT))
    draw, width = ImageDraw.Draw(grid), columns[0].shape[-1]
    for i, title in enumerate(titles):
        draw.text((i * width + 2, 1), title, fill="black")
    return grid


def run(args):
    """Encode the images with every VAE and write the grid; returns its path."""
    import torch

    from dataset.h5 import ImageDataset
    from utils.files import atomic_write
    from weights.vae import load_vaes

    device = resolve_device(args.device)
    dataset = ImageDataset(args.data_dir)
    vaes = load_vaes(args.vae, args.vae_ckpt, dataset.image_size, args.seed)
    indices = range(args.start_index, min(args.start_index + args.num_images, len(dataset)))
    if not indices:
        raise UserError(f"--start-index {args.start_index} is past the {len(dataset)} images of {args.data_dir}")
    images = torch.stack([dataset[i][0] for i in indices])
    columns, titles = [images], ["input"]
    for ckpt, vae in vaes.items():
        columns.append(latent_pictures(vae.to(device), images, device))
        vae.cpu()
        titles.append(Path(ckpt.rstrip("/")).name)
    output = Path(args.output)
    with atomic_write(output) as tmp:
        grid_image(columns, titles).save(tmp, format="PNG")
    return output


def main(argv=None):
    """Parse flags, write the grid; returns its path."""
    args = build_parser().parse_args(argv)
    output = run(args)
    print(f"Wrote {output} (rows: images; columns: input, {', '.join(args.vae_ckpt)})")
    return output


if __name__ == "__main__":
    report_user_errors(main)()
