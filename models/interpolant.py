"""Flow-matching interpolant shared by SiT training and the samplers: paths, time sampling, per-sample means."""
import math

import torch


def mean_flat(x):
    """Mean over all dimensions except the first (batch)."""
    return x.mean(dim=list(range(1, x.ndim)))


def interpolant(t, path_type="linear"):
    """Coefficients of x_t = alpha_t x + sigma_t eps and their time derivatives: (alpha, sigma, d_alpha, d_sigma)."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi_t = t * math.pi / 2
        return (torch.cos(half_pi_t), torch.sin(half_pi_t),
                -math.pi / 2 * torch.sin(half_pi_t), math.pi / 2 * torch.cos(half_pi_t))
    raise NotImplementedError(f"path_type {path_type!r} is not 'linear' or 'cosine'")


def lognormal_time(rnd_normal, path_type="linear"):
    """Map a standard-normal draw to the time whose noise-to-signal ratio is sigma = exp(draw) (EDM)."""
    sigma = rnd_normal.exp()
    if path_type == "linear":
        return sigma / (1 + sigma)
    if path_type == "cosine":
        return 2 / math.pi * torch.atan(sigma)
    raise NotImplementedError(f"path_type {path_type!r} is not 'linear' or 'cosine'")


def sample_time(batch_size, weighting="uniform", path_type="linear"):
    """Training times, shape (B,1,1,1); drawn on the CPU generator, so seeded runs repeat on any device."""
    shape = (batch_size, 1, 1, 1)
    if weighting == "uniform":
        return torch.rand(shape)
    if weighting == "lognormal":
        return lognormal_time(torch.randn(shape), path_type)
    raise NotImplementedError(f"weighting {weighting!r} is not 'uniform' or 'lognormal'")
