"""Peak memory of the REPA-E training step with and without the trainers' --grad-checkpointing, and the largest
per-device batch that fits a memory budget.

    python bench/bench_memory.py                            # 128 px, SiT-B/2, f8d4, DINOv2-B, batches 2 and 4
    python bench/bench_memory.py --batch-sizes 2,4,8 --budget-gib 12 --verify
    python bench/bench_memory.py --switches on              # with --grad-checkpointing only

Each (batch, switch) runs in a fresh process that builds the networks with train_repae.build and runs two
train_repae.repae_step + EMA updates (the functions bench_step.py times; the first step also allocates gradients
and optimizer states). Memory: CUDA max allocated, or on CPU the process's peak resident set (VmHWM), and what the
process held once built (before the first step). `step` = peak - built: activations, gradients, optimizer states.
The largest batch within --budget-gib comes from a straight-line fit of the peak over --batch-sizes; --verify
runs that batch once per switch and prints its measured peak.
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import bench_step, harness  # noqa: E402
from utils.cli import HelpFormatter  # noqa: E402

SWITCHES = ("off", "on")


def build_parser():
    """The bench's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--resolution", type=int, default=128, help="image side in pixels")
    parser.add_argument("--batch-sizes", default="2,4", help="comma list of per-device batches to measure")
    parser.add_argument("--switches", default=",".join(SWITCHES),
                        help="comma list of the --grad-checkpointing settings to measure (off,on)")
    parser.add_argument("--model", default="SiT-B/2", help="SiT size")
    parser.add_argument("--vae", default="f8d4", help="VAE layout")
    parser.add_argument("--enc-type", default="dinov2-vit-b", help="frozen representation encoder")
    parser.add_argument("--encoder-depth", type=int, default=4, help="SiT block aligned with the encoder")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="autocast dtype")
    parser.add_argument("--budget-gib", type=float, default=16.0, help="memory budget for the largest batch")
    parser.add_argument("--verify", action="store_true", help="also run the largest batch found for each switch")
    parser.add_argument("--work-dir", default="/tmp/repae-bench", help="where the bench data set is made and kept")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--grad-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    return parser


def memory_mib():
    """(held now, peak so far) in MiB: CUDA allocated, or this process's resident set."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2 ** 20, torch.cuda.max_memory_allocated() / 2 ** 20
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def measure_child(args):
    """Build, two steps; the memory figures of this process."""
    step_args = bench_step.build_parser().parse_args([
        "--resolution", str(args.resolution), "--batch-size", str(args.child), "--model", args.model, "--vae",
        args.vae, "--enc-type", args.enc_type, "--encoder-depth", str(args.encoder_depth), "--mixed-precision",
        args.mixed_precision, "--work-dir", args.work_dir, "--data-dir", args.data_dir]
        + (["--grad-checkpointing"] if args.grad_checkpointing else []))
    step = bench_step.repae_steps(step_args)["default"]
    built, _ = memory_mib()
    step()
    step()
    _, peak = memory_mib()
    return dict(batch=args.child, built_mib=built, peak_mib=peak, device=harness.device_name())


def run(args, batch, switch):
    """Memory figures of one (batch, switch) in a fresh process."""
    data_dir, _ = harness.make_bench_data(Path(args.work_dir), resolution=args.resolution, images=max(16, batch),
                                          vae=args.vae)
    argv = ["--resolution", args.resolution, "--model", args.model, "--vae", args.vae, "--enc-type", args.enc_type,
            "--encoder-depth", args.encoder_depth, "--mixed-precision", args.mixed_precision, "--work-dir",
            args.work_dir, "--data-dir", data_dir, "--child", batch]
    if switch == "on":
        argv.append("--grad-checkpointing")
    return harness.run_child(Path(__file__), [str(a) for a in argv])


def step_mib(row):
    """What the steps added to the built networks' memory."""
    return row["peak_mib"] - row["built_mib"]


def fit_peak(rows, budget_mib):
    """(fixed MiB, MiB per image, largest batch within budget_mib) of the straight line through the rows' peaks;
    the batch is None when the peak does not grow with the batch."""
    per_image, fixed = statistics.linear_regression([row["batch"] for row in rows], [row["peak_mib"] for row in rows])
    return fixed, per_image, int((budget_mib - fixed) // per_image) if per_image > 0 else None


def main(argv=None):
    """Print the table (parent) or measure one (batch, switch) and hand it back (child)."""
    args = build_parser().parse_args(argv)
    if args.child:
        harness.emit(measure_child(args))
        return
    batches = [int(b) for b in args.batch_sizes.split(",")]
    switches = args.switches.split(",")
    if not set(switches) <= set(SWITCHES):
        sys.exit(f"--switches takes a comma list of {', '.join(SWITCHES)}")
    results = {switch: [run(args, batch, switch) for batch in batches] for switch in switches}
    print(f"\n## REPA-E step memory, --grad-checkpointing {'/'.join(switches)}  "
          f"({results[switches[0]][0]['device']})")
    print(f"{args.model} {args.vae} {args.enc_type} {args.resolution}px {args.mixed_precision}; MiB")
    print(f"{'batch':>5s} {'switch':>6s} {'built':>8s} {'peak':>8s} {'step':>8s} {'peak cut':>9s} {'step cut':>9s}")
    for i in range(len(batches)):
        for switch in switches:
            row, cuts = results[switch][i], ("", "")
            if switch == "on" and "off" in results:
                off = results["off"][i]
                cuts = (f"{100 * (1 - row['peak_mib'] / off['peak_mib']):.1f}%",
                        f"{100 * (1 - step_mib(row) / step_mib(off)):.1f}%")
            print(f"{row['batch']:5d} {switch:>6s} {row['built_mib']:8.0f} {row['peak_mib']:8.0f} "
                  f"{step_mib(row):8.0f} {cuts[0]:>9s} {cuts[1]:>9s}")
    if len(batches) > 1:
        budget = args.budget_gib * 1024
        for switch in switches:
            fixed, per_image, batch = fit_peak(results[switch], budget)
            line = f"--grad-checkpointing {switch}: peak = {fixed:.0f} MiB + {per_image:.0f} MiB per image; "
            if batch is None:
                print(line + "the peak does not grow with the batch")
                continue
            line += f"largest batch within {args.budget_gib:g} GiB: {batch} (fitted)"
            if args.verify and batch > 0:
                peak = run(args, batch, switch)["peak_mib"]
                line += f", measured peak at batch {batch}: {peak:.0f} MiB ({'within' if peak <= budget else 'over'})"
            print(line)
    print(f"command: python bench/bench_memory.py {' '.join(sys.argv[1:] if argv is None else argv)}")


if __name__ == "__main__":
    main()
