"""REPA representation-alignment loss."""
import torch.nn.functional as F


def repa_loss(zs_tilde, zs):
    """Negative cosine similarity of projected SiT tokens and encoder tokens, mean over tokens, samples, encoders."""
    losses = [-(F.normalize(z_tilde, dim=-1) * F.normalize(z, dim=-1)).sum(dim=-1).mean()
              for z_tilde, z in zip(zs_tilde, zs, strict=True)]
    return sum(losses) / len(losses)
