"""The ADM evaluator's metrics in PyTorch/numpy: FID, sFID, Inception Score, precision/recall.

Every definition follows openai/guided-diffusion `evaluations/evaluator.py` (the numbers the diffusion papers
report, REPA-E included):
- FID: Frechet distance of (mean, np.cov) of the 2048-d `pool_3` features, with the evaluator's fallback that adds
  eps to the covariance diagonals when the matrix square root of their product is not finite;
- sFID: the same on the spatial features `mixed_6/conv[..., :7]` (17x17x7 = 2023 values per image, flattened in
  NHWC order as TensorFlow lays them out, so precomputed `mu_s`/`sigma_s` of the reference batches fit);
- Inception Score: softmax of pool_3 times the logits weight matrix (no bias), exp of the mean KL in splits of 5000;
- precision/recall: the k=3 manifold estimator on pool_3, squared distances computed in float16 per 10000x10000
  block, in float32 for a block where float16 overflows, as the evaluator's DistanceBlock.
"""
import warnings

import numpy as np
import torch
from scipy import linalg

from utils.errors import UserError

DISTANCE_BATCH_SIZE = 10000  # the evaluator's ManifoldEstimator row and column batch sizes


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between Gaussians (mu1, sigma1) and (mu2, sigma2), as the ADM evaluator computes it."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics do not match: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # numerical error might give a slight imaginary component
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_statistics(features):
    """(mean, covariance) of (N, D) features: np.mean and np.cov(rowvar=False), as the evaluator."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def inception_score(softmax_probs, split_size=5000):
    """Inception Score of (N, classes) class probabilities: mean over splits of exp(mean KL(p(y|x) || p(y)))."""
    scores = []
    for start in range(0, len(softmax_probs), split_size):
        part = softmax_probs[start:start + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def pairwise_distances(u, v):
    """Squared distances (float32) between rows of u and v, computed in float16 unless that overflows.

    The evaluator's DistanceBlock: float16 inputs and results (products summed in float32, as TensorFlow's GPU
    kernels do), the float32 computation instead for a block with a non-finite float16 value.
    """
    u16, v16 = u.half(), v.half()
    norm_u = (u16 * u16).float().sum(1).half()
    norm_v = (v16 * v16).float().sum(1).half()
    products = (u16.float() @ v16.float().T).half()
    distances = torch.clamp_min(norm_u[:, None] - 2 * products + norm_v[None, :], 0)
    if torch.isfinite(distances).all():
        return distances.float()
    u, v = u.float(), v.float()
    return torch.clamp_min((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :], 0)


def _as_tensor(features, device):
    """float32 torch view of a numpy feature array on device."""
    return torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)


def manifold_radii(features, k=3, batch_size=DISTANCE_BATCH_SIZE, device="cpu"):
    """(N,) float32 squared distance of each feature to its k-th nearest neighbour, itself counting as the 0-th."""
    features = _as_tensor(features, device)
    if len(features) <= k:
        raise UserError(f"precision and recall need more than k={k} images per batch, got {len(features)}: "
                        "score more images")
    radii = np.zeros(len(features), dtype=np.float32)
    for start in range(0, len(features), batch_size):
        rows = features[start:start + batch_size]
        nearest = []  # the k+1 smallest of each column block hold the k+1 smallest of the whole row
        for col in range(0, len(features), batch_size):
            distances = pairwise_distances(rows, features[col:col + batch_size])
            nearest.append(distances.topk(min(k + 1, distances.shape[1]), dim=1, largest=False).values)
        radii[start:start + len(rows)] = torch.cat(nearest, 1).kthvalue(k + 1, dim=1).values.cpu().numpy()
    return radii


def precision_recall(ref_features, sample_features, k=3, batch_size=DISTANCE_BATCH_SIZE, device="cpu"):
    """(precision, recall): the fraction of samples inside the reference manifold and of references in the samples'.

    A point is inside a manifold when its squared distance to one of the manifold's points is at most that point's
    k-NN radius (manifold_radii), as the evaluator's ManifoldEstimator.evaluate_pr.
    """
    ref_radii = torch.from_numpy(manifold_radii(ref_features, k, batch_size, device)).to(device)
    sample_radii = torch.from_numpy(manifold_radii(sample_features, k, batch_size, device)).to(device)
    ref, samples = _as_tensor(ref_features, device), _as_tensor(sample_features, device)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_inside = torch.zeros(len(samples), dtype=torch.bool, device=device)
    for row in range(0, len(ref), batch_size):
        for col in range(0, len(samples), batch_size):
            distances = pairwise_distances(ref[row:row + batch_size], samples[col:col + batch_size])
            rows, cols = slice(row, row + len(distances)), slice(col, col + distances.shape[1])
            ref_inside[rows] |= (distances <= sample_radii[None, cols]).any(1)
            sample_inside[cols] |= (distances <= ref_radii[rows, None]).any(0)
    return float(sample_inside.double().mean()), float(ref_inside.double().mean())


