"""What the benchmarks share: repeated timing, this machine's fp32 matmul rate, peak memory, one fresh process per
row, the bench data set, and the table.

A row is a dict: name, config, unit ("ms" per call or "img/s"), times (seconds per call), items (images per call),
flops (per call), host_reads (per call), peak_mib and matmul_flops (the dense fp32 rate measured in that process).
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]



def bench_parser(description, repeats_help):
    """A bench's argument parser with the flag every bench has: --repeats (timed calls per row)."""
    import argparse

    from utils.cli import HelpFormatter

    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help=repeats_help)
    return parser

def synchronize():
    """Wait for queued device work (CUDA); nothing on CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn, repeats):
    """Seconds of each of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(size=1024, repeats=5):
    """This process's dense fp32 matrix-multiply rate in FLOP/s now (median of repeats, TF32 as configured); the
    benches take the median of one such figure per timed round, so a shared machine's load affects both alike."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    a @ b
    return 2 * size ** 3 / statistics.median(time_calls(lambda: a @ b, repeats))


def peak_memory_mib():
    """CUDA: max allocated since start; CPU: this process's peak resident set."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name():
    """The device the rows ran on, in words."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"


def emit(rows):
    """Hand rows from a child process to its parent (one JSON line on stdout)."""
    print("BENCH-ROWS " + json.dumps(rows))


def run_child(script, argv):
    """Rows measured by `script argv` in a fresh Python process."""
    result = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH-ROWS ")]
    if result.returncode != 0 or not lines:
        sys.exit(f"{script.name} {' '.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("BENCH-ROWS "))


def spread(values):
    """(min, max) of values as percentages of their median."""
    median = statistics.median(values)
    return 100 * (min(values) / median - 1), 100 * (max(values) / median - 1)


def format_row(row):
    """One table line."""
    median = statistics.median(row["times"])
    low, high = spread(row["times"])
    value = row["items"] / median if row["unit"] == "img/s" else 1e3 * median
    flops = row.get("flops")
    rate = f"{100 * flops / median / row['matmul_flops']:5.1f}" if flops else "    -"
    gflops = f"{flops / 1e9:9.1f}" if flops else "        -"
    peak = f"{row['peak_mib']:8.0f}" if row.get("peak_mib") else "       -"
    reads = f"{row['host_reads']:6d}" if row.get("host_reads") is not None else "     -"
    return (f"{row['name']:46s} {value:10.2f} {row['unit']:5s} {low:+6.1f}/{high:+5.1f}% {len(row['times']):3d} "
            f"{gflops} {rate} {peak} {reads}  {row['config']}")


def print_table(title, rows):
    """The rows under a header naming the device and the columns."""
    print(f"\n## {title}  ({rows[0]['device'] if rows else ''})")
    print(f"{'row':46s} {'median':>10s} {'unit':5s} {'min/max vs med':>14s} {'n':>3s} {'GFLOP':>9s} "
          f"{'%mm':>5s} {'peak MiB':>8s} {'reads':>6s}  config")
    for row in rows:
        print(format_row(row))
    print("%mm: achieved FLOP/s as a percentage of the dense fp32 matmul rate measured in the row's process; "
          "reads: host reads of tensor values per call; peak: max allocated (CUDA) or peak RSS of the row's process.")


def run_script(script, *args):
    """Run a repository script with this Python; stop the bench with its output if it fails."""
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def make_bench_data(work_dir, *, resolution, images, vae, latents=False, latents_name="bench-vae"):
    """Under work_dir/VAE-RESpx-IMAGES: data/images.h5 of random labelled images (preprocessing.py), a random-weight
    VAE file with latent statistics and, with latents=True, its cached latents (cache_latents.py); returns (data
    folder, VAE file). Reused when already there."""
    import numpy as np
    import torch
    from PIL import Image

    from models.autoencoder import vae_models

    folder = Path(work_dir) / f"{vae}-{resolution}px-{images}"
    data, vae_file = folder / "data", folder / "vae" / f"{latents_name}.pt"
    if not (data / "images.h5").is_file():
        rng = np.random.default_rng(0)
        for i in range(images):
            class_dir = folder / "source" / f"class{i % 4}"
            class_dir.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(class_dir / f"{i}.png")
        run_script("preprocessing.py", "--imagenet-path", folder / "source", "--output-path", data,
                   "--resolution", resolution, "--num-workers", 1)
    if not vae_file.is_file():
        vae_file.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(vae_models[vae]().state_dict(), vae_file)
        channels = vae_models[vae]().latent_channels
        torch.save({"latents_scale": torch.ones(1, channels, 1, 1), "latents_bias": torch.zeros(1, channels, 1, 1)},
                   vae_file.with_name(f"{latents_name}-latents-stats.pt"))
    if latents and not (data / f"{latents_name}.h5").is_file():
        run_script("cache_latents.py", "--vae-arch", vae, "--vae-ckpt-path", vae_file, "--vae-latents-name",
                   latents_name, "--data-dir", data, "--output-dir", data, "--pproc-batch-size", 8,
                   "--num-workers", 0)
    return data, vae_file
