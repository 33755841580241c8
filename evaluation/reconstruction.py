"""Reconstruction quality of a VAE, as eval_vae.py reports it and train_repae.py watches it during training.

Each image is encoded to its posterior mean and decoded; the reconstruction is turned into uint8 pixels as
generate.py saves samples and compared with the original: PSNR and SSIM (torchmetrics, 11x11 Gaussian window) on the
0..255 pixels, LPIPS-VGG on [-1, 1] images, and the Inception pool features for rFID.
"""
import numpy as np
import torch
from tqdm import tqdm

from models.autoencoder import preprocess_imgs_vae, to_uint8
from weights.latent_stats import LatentMoments


def psnr(reconstructions, originals):
    """Per-image PSNR in dB of uint8 images (B, 3, H, W)."""
    mse = (reconstructions.double() - originals.double()).pow(2).mean(dim=(1, 2, 3))
    return 10 * (255.0 ** 2 / mse).log10()


def evaluate_vae(vae, loader, device, lpips, inception):
    """Reconstruct every batch of uint8 images; returns (metrics dict, reconstruction pool features or None)."""
    from torchmetrics.functional.image import structural_similarity_index_measure  # slow to import

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
    mean, std = (value.tolist() for value in moments.mean_std())
    metrics = {"psnr": torch.cat(psnrs).mean().item(), "ssim": torch.cat(ssims).mean().item(),
               "lpips": torch.cat(lpipses).mean().item(), "latent_mean": mean, "latent_std": std}
    return metrics, (np.concatenate(pools) if pools else None)


def original_features(inception, loader):
    """Pool features of the original images."""
    return np.concatenate([inception.activations(images.permute(0, 2, 3, 1))[0]
                           for images, _ in tqdm(loader, desc="original images", unit="batch")])
