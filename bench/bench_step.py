"""Speed (and, on CUDA, memory) of the pieces this codebase changed against the published code.

    python bench/bench_step.py            # prints a table; runs on CPU or GPU

1. REPA loss: vectorized (loss/repa.py) against the published per-sample Python loop.
2. VAE attention: torch's scaled_dot_product_attention (models/autoencoder.py) against the published
   explicit softmax(QK^T)V, at the f8d4 middle block of a 256-px image.
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loss.repa import repa_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def timed(fn, repeats=5):
    """Median seconds of fn() and peak CUDA memory in MiB (0 on CPU)."""
    fn()
    times = []
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else 0.0
    return sorted(times)[len(times) // 2], peak


def published_repa_loss(zs_tilde, zs):
    """The published loop: per encoder, per sample, normalized cosine."""
    proj_loss = 0.0
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_tilde_j = F.normalize(z_tilde_j, dim=-1)
            z_j = F.normalize(z_j, dim=-1)
            proj_loss += -(z_j * z_tilde_j).sum(dim=-1).mean()
    return proj_loss / (len(zs) * bsz)


def published_attention(q, k, v):
    """Explicit attention as in the published VAE (materializes the HW x HW matrix)."""
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return weights @ v


def main():
    """Print one row per benchmark."""
    batch = 64 if DEVICE == "cpu" else 256
    zs = [torch.randn(batch, 256, 768, device=DEVICE)]
    zs_tilde = [torch.randn(batch, 256, 768, device=DEVICE, requires_grad=True)]
    rows = []
    for name, fn in (("REPA loss, published loop", lambda: published_repa_loss(zs_tilde, zs).backward()),
                     ("REPA loss, vectorized", lambda: repa_loss(zs_tilde, zs).backward())):
        rows.append((name, f"B={batch} T=256 D=768 fwd+bwd", *timed(fn)))

    b, c, hw = (4 if DEVICE == "cpu" else 16), 512, 32 * 32
    q, k, v = (torch.randn(b, 1, hw, c, device=DEVICE, requires_grad=True) for _ in range(3))
    for name, fn in (("VAE attention, published", lambda: published_attention(q, k, v).sum().backward()),
                     ("VAE attention, SDPA", lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())):
        rows.append((name, f"B={b} C=512 32x32 fwd+bwd", *timed(fn)))

    print(f"device: {DEVICE} ({torch.cuda.get_device_name() if DEVICE == 'cuda' else torch.get_num_threads()} "
          f"{'' if DEVICE == 'cuda' else 'threads'})")
    print(f"{'benchmark':28s} {'shape':32s} {'ms':>9s} {'peak MiB':>9s}")
    for name, shape, seconds, peak in rows:
        print(f"{name:28s} {shape:32s} {seconds * 1e3:9.1f} {peak:9.0f}")


if __name__ == "__main__":
    main()
