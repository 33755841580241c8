"""Data throughput: images/s from images.h5 and latents/s from cached latents through the trainers' data loader
(training.setup.make_dataloader over dataset.h5.ImageDataset / ImageLatentDataset) with N workers, and the images/s
of a whole cache_latents.py run.

    python bench/bench_data.py                      # 128 px, batch 32, 0 and 2 workers, cache_latents with f8d4
    python bench/bench_data.py --workers 0,4,8 --resolution 256 --images 2048

The loaders read a data set of --images random images (latents cached with the f8d4-tiny VAE: the same latent
shape as f8d4, made quickly); cache_latents.py encodes --cache-images images with a random-weight --vae, and its
row counts the whole process (start-up and model build included). Each row runs in a fresh process; a loader's
peak RSS is that of the main process (workers not included), cache_latents.py's is that of its process.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import harness  # noqa: E402


def build_parser():
    """The bench's flags."""
    parser = harness.bench_parser(__doc__, "timed passes per row")
    parser.add_argument("--resolution", type=int, default=128, help="image side in pixels")
    parser.add_argument("--images", type=int, default=256, help="images in the loaders' data set")
    parser.add_argument("--batch-size", type=int, default=32, help="loader batch size")
    parser.add_argument("--workers", default="0,2", help="comma list of loader worker counts")
    parser.add_argument("--vae", default="f8d4", help="VAE layout cache_latents.py encodes with")
    parser.add_argument("--cache-images", type=int, default=16, help="images cache_latents.py encodes")
    parser.add_argument("--work-dir", default="/tmp/repae-bench", help="where the bench data sets are made and kept")
    parser.add_argument("--child", choices=["images", "latents"], help=argparse.SUPPRESS)
    parser.add_argument("--num-workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    return parser


def loader_rows(args):
    """One row: full passes of the trainers' loader over the data set."""
    from dataset.h5 import ImageDataset, ImageLatentDataset
    from training.setup import make_accelerator, make_dataloader

    accelerator = make_accelerator(mixed_precision="no", gradient_accumulation_steps=1, report_to="none",
                                   logging_dir=Path(args.work_dir) / "logs")
    dataset = ImageDataset(args.data_dir) if args.child == "images" else ImageLatentDataset(args.data_dir,
                                                                                            "bench-vae")
    loader, sampler = make_dataloader(dataset, global_batch_size=args.batch_size, accelerator=accelerator, seed=0,
                                      num_workers=args.num_workers)
    epoch = [0]

    def one_pass():
        sampler.set_epoch(epoch[0])
        epoch[0] += 1
        for _ in loader:
            pass

    one_pass()
    times = harness.time_calls(one_pass, args.repeats)
    what = "images.h5 images" if args.child == "images" else "cached latents (+ images)"
    return [dict(name=f"loader: {what}, {args.num_workers} workers", unit="img/s", items=len(loader) * args.batch_size,
                 times=times, peak_mib=harness.peak_memory_mib(), matmul_flops=None, device=harness.device_name(),
                 config=f"{args.resolution}px b{args.batch_size} {len(dataset)} items")]


def cache_latents_row(args, data_dir, vae_file):
    """Whole cache_latents.py runs over the small data set, each timed with its own process's peak RSS."""
    times, peaks = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, str(harness.ROOT / "cache_latents.py"), "--vae-arch", args.vae, "--vae-ckpt-path",
             str(vae_file), "--vae-latents-name", "bench-timed", "--data-dir", str(data_dir), "--output-dir",
             str(Path(args.work_dir) / "cache-latents-out"), "--pproc-batch-size", "8", "--num-workers", "0",
             "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=harness.ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            sys.exit(f"cache_latents.py failed:\n{process.stderr.read().decode()[-3000:]}")
        times.append(time.perf_counter() - start)
        peaks.append(usage.ru_maxrss / 1024)
    return dict(name=f"cache_latents.py, {args.vae} (whole run)", unit="img/s", items=args.cache_images, times=times,
                peak_mib=max(peaks), matmul_flops=None, device=harness.device_name(),
                config=f"{args.resolution}px {args.cache_images} images, batch 8, 0 workers")


def main(argv=None):
    """Print the table (parent) or measure one loader row and hand it back (child)."""
    args = build_parser().parse_args(argv)
    if args.child:
        harness.emit(loader_rows(args))
        return
    work = Path(args.work_dir)
    loader_data, _ = harness.make_bench_data(work, resolution=args.resolution, images=args.images, vae="f8d4-tiny",
                                             latents=True)
    cache_data, vae_file = harness.make_bench_data(work, resolution=args.resolution, images=args.cache_images,
                                                   vae=args.vae)
    rows = []
    for child in ("images", "latents"):
        for workers in args.workers.split(","):
            rows += harness.run_child(Path(__file__), [
                "--child", child, "--num-workers", workers, "--data-dir", str(loader_data), "--batch-size",
                str(args.batch_size), "--repeats", str(args.repeats), "--resolution", str(args.resolution),
                "--work-dir", args.work_dir])
    rows.append(cache_latents_row(args, cache_data, vae_file))
    harness.print_table("data (training.setup.make_dataloader, cache_latents.py)", rows)
    print(f"command: python bench/bench_data.py {' '.join(sys.argv[1:] if argv is None else argv)}")


if __name__ == "__main__":
    main()
