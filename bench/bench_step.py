"""Time the training steps the trainers run: train_repae.repae_step (and its labelled parts) and
train_ldm_only.ldm_step, each followed by the loop's EMA update, on networks made by the trainers' own `build`.

    python bench/bench_step.py                              # 128 px, batch 2, SiT-B/2, f8d4, DINOv2-B, fp32, eager
    python bench/bench_step.py --configs default,loop-adamw-vae-ckpt   # both step configurations, alternately
    python bench/bench_step.py --grad-checkpointing         # activation checkpointing switch of the trainers
    python bench/bench_step.py --profile                    # where one REPA-E step spends its time, by operator
    python bench/bench_step.py --resolution 256 --batch-size 32 --model SiT-XL/2 --mixed-precision bf16 --compile

Weights are random (--vae-ckpt none, --enc-random-init, --lpips-random-init); the images come from an images.h5
made by preprocessing.py (and, for the LDM step, latents cached by cache_latents.py) under --work-dir.
Each step row runs in a fresh process. Per-part times come from the step's own `repae/...` profiler ranges:
while timing, torch.profiler.record_function is wrapped so that each range also keeps its seconds and FLOPs.

Configurations (--configs), on the same networks and batch:
  default               the trainers' step: fused AdamW that takes the non-finite guard's verdict on the device,
                        metrics left on the device, VAE activation checkpointing only with --grad-checkpointing.
  loop-adamw-vae-ckpt   torch.optim.AdamW(foreach=False, fused=False), the per-parameter loop, which reads the
                        guard's verdict on the host before each update; activation checkpointing of every VAE
                        residual block; every metric read to the host after each step.
"""
import argparse
import collections
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import harness  # noqa: E402
from utils.host_reads import count_host_reads  # noqa: E402

PARTS = ("repae/encoder_features", "repae/vae_forward", "repae/vae_update", "repae/discriminator_update",
         "repae/sit_update", "repae/ema")
CONFIGS = ("default", "loop-adamw-vae-ckpt")


def build_parser():
    """The bench's flags."""
    parser = harness.bench_parser(__doc__, "timed steps per configuration")
    parser.add_argument("--resolution", type=int, default=128, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (one process)")
    parser.add_argument("--model", default="SiT-B/2", help="SiT size")
    parser.add_argument("--vae", default="f8d4", help="VAE layout")
    parser.add_argument("--enc-type", default="dinov2-vit-b", help="frozen representation encoder")
    parser.add_argument("--encoder-depth", type=int, default=4, help="SiT block aligned with the encoder")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="autocast dtype")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile")
    parser.add_argument("--grad-checkpointing", action="store_true", help="the trainers' activation checkpointing")
    parser.add_argument("--configs", default="default",
                        help=f"comma list of {','.join(CONFIGS)} (timed alternately)")
    parser.add_argument("--rows", default="repae,ldm", help="comma list of repae,ldm")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    parser.add_argument("--work-dir", default="/tmp/repae-bench", help="where the bench data set is made and kept")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the table: torch.profiler's busiest operators in one default REPA-E step")
    parser.add_argument("--child", choices=["repae", "ldm"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--vae-file", help=argparse.SUPPRESS)
    return parser


def describe(args, config):
    """The configuration in one line."""
    precision = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[args.mixed_precision]
    return (f"{config}: {args.model} {args.vae} {args.enc_type} {args.resolution}px b{args.batch_size} {precision} "
            f"{'compiled' if args.compile else 'eager'}{' grad-ckpt' if args.grad_checkpointing else ''}")


def training_argv(args, data_dir, extra=()):
    """Trainer flags of the bench configuration (random weights, one process, no tracking)."""
    argv = ["--data-dir", data_dir, "--resolution", args.resolution, "--batch-size", args.batch_size,
            "--model", args.model, "--vae", args.vae, "--enc-type", args.enc_type, "--encoder-depth",
            args.encoder_depth, "--mixed-precision", args.mixed_precision, "--num-workers", 0, "--report-to", "none",
            "--exp-name", "bench", "--output-dir", Path(args.work_dir) / "exps", "--enc-random-init",
            "--compile" if args.compile else "--no-compile", *extra]
    if args.grad_checkpointing:
        argv.append("--grad-checkpointing")
    return [str(a) for a in argv]


@contextlib.contextmanager
def timed_ranges(seconds, flops, flop_mode=None):
    """While active, every torch.profiler.record_function range also appends its seconds to seconds[name] and
    stores its FLOPs (under flop_mode) in flops[name]. The stand-in is a subclass: torch.compile checks instances
    against torch.profiler.record_function."""
    import torch.profiler

    real = torch.profiler.record_function

    class TimedRange(real):
        def __enter__(self):
            entered = super().__enter__()
            harness.synchronize()
            self.start, self.flops_before = time.perf_counter(), flop_mode.get_total_flops() if flop_mode else 0
            return entered

        def __exit__(self, *exc_info):
            harness.synchronize()
            seconds[self.name].append(time.perf_counter() - self.start)
            if flop_mode:
                flops[self.name] = flop_mode.get_total_flops() - self.flops_before
            return super().__exit__(*exc_info)

    torch.profiler.record_function = TimedRange
    try:
        yield
    finally:
        torch.profiler.record_function = real


def measure(step_fns, args, name):
    """Rows of alternately timed step functions: warm-up, one counted step (FLOPs, host reads), timed steps."""
    from torch.utils.flop_counter import FlopCounterMode

    for step_fn in step_fns.values():
        for _ in range(args.warmup):
            step_fn()
    counted = {}
    for config, step_fn in step_fns.items():
        seconds, flops = collections.defaultdict(list), {}
        with count_host_reads() as reads, FlopCounterMode(display=False) as mode, \
                timed_ranges(seconds, flops, mode):
            step_fn()
        counted[config] = dict(flops=mode.get_total_flops(), parts=flops, host_reads=reads["reads"])
    times = {config: [] for config in step_fns}
    part_times = {config: collections.defaultdict(list) for config in step_fns}
    rates = []
    for _ in range(args.repeats):
        for config, step_fn in step_fns.items():
            with timed_ranges(part_times[config], {}):
                times[config] += harness.time_calls(step_fn, 1)
        rates.append(harness.matmul_rate())
    rate = statistics.median(rates)
    alone = len(step_fns) == 1  # the process's peak belongs to one configuration
    rows = []
    for config in step_fns:
        base = dict(config=describe(args, config), unit="ms", items=args.batch_size, matmul_flops=rate,
                    device=harness.device_name())
        peak = harness.peak_memory_mib() if alone else None
        rows.append(dict(base, name=f"{name} [{config}]", times=times[config], flops=counted[config]["flops"],
                         host_reads=counted[config]["host_reads"], peak_mib=peak))
        for part in (part for part in PARTS if part in part_times[config]):
            rows.append(dict(base, name=f"  {part}", times=part_times[config][part],
                             flops=counted[config]["parts"].get(part)))
    return rows


def accelerator_for(args):
    """The trainers' accelerator for the bench's precision."""
    from training.setup import make_accelerator

    return make_accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=1, report_to="none",
                            logging_dir=Path(args.work_dir) / "logs")


def host_guarded_adamw():
    """torch.optim.AdamW that reads the guard's verdict on the host and skips a non-finite update itself (the
    per-parameter loop AdamW refuses a device-side found_inf)."""
    import torch

    class HostGuardedAdamW(torch.optim.AdamW):
        found_inf = None

        def step(self, closure=None):
            found_inf, self.found_inf = self.found_inf, None
            if found_inf is not None and bool(found_inf):
                return None
            return super().step(closure)

    return HostGuardedAdamW


def loop_adamw_nets(nets, accelerator, targs):
    """The same networks with per-parameter loop AdamW optimizers that read the guard's verdict on the host."""
    import dataclasses

    adamw = host_guarded_adamw()

    def plain_adamw(optimizer, lr):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return accelerator.prepare_optimizer(adamw(
            params, lr=lr, betas=(targs.adam_beta1, targs.adam_beta2), weight_decay=targs.adam_weight_decay,
            eps=targs.adam_epsilon, foreach=False, fused=False))

    return dataclasses.replace(nets, opt_sit=plain_adamw(nets.opt_sit, targs.learning_rate),
                               opt_vae=plain_adamw(nets.opt_vae, targs.vae_learning_rate),
                               opt_disc=plain_adamw(nets.opt_disc, targs.disc_learning_rate))


def repae_steps(args):
    """{config: one train_repae.repae_step + EMA} on networks made by train_repae.build, sharing one batch."""
    import torch
    import torch.profiler
    from accelerate.utils import set_seed

    import train_repae
    from dataset.h5 import ImageDataset
    from training.guard import NonFiniteGuard
    from training.setup import load_loss_config
    from training.step import unwrap

    targs = train_repae.parse_args(training_argv(args, args.data_dir, ["--vae-ckpt", "none", "--lpips-random-init"]))
    accelerator = accelerator_for(args)
    loss_config = load_loss_config(harness.ROOT / targs.loss_cfg_path, "--loss-cfg-path")
    set_seed(0)
    nets, loader, _ = train_repae.build(targs, accelerator, ImageDataset(args.data_dir), loss_config)
    raw_image, labels = (t.to(accelerator.device) for t in next(iter(loader)))
    guard, step = NonFiniteGuard(), [0]
    loss_kwargs = dict(path_type=targs.path_type, prediction=targs.prediction, weighting=targs.weighting)
    variants = {"default": nets, "loop-adamw-vae-ckpt": loop_adamw_nets(nets, accelerator, targs)}

    def step_fn(config):
        def run():
            unwrap(nets.vae).set_grad_checkpointing(config == "loop-adamw-vae-ckpt" or args.grad_checkpointing)
            logs = train_repae.repae_step(variants[config], raw_image, labels, step[0], accelerator, guard,
                                          loss_kwargs=loss_kwargs, proj_coeff=targs.proj_coeff,
                                          vae_align_proj_coeff=targs.vae_align_proj_coeff,
                                          max_grad_norm=targs.max_grad_norm, ema_decay=targs.ema_decay)
            if config == "loop-adamw-vae-ckpt":
                {name: value.item() for name, value in logs.items() if value is not None}
            step[0] += 1
        return run

    torch.manual_seed(0)
    return {config: step_fn(config) for config in args.configs.split(",")}


def repae_rows(args):
    """Rows of train_repae.repae_step + EMA for each configuration, timed alternately in this process."""
    return measure(repae_steps(args), args, "REPA-E step + EMA")


def ldm_rows(args):
    """Rows of train_ldm_only.ldm_step + EMA on cached latents."""
    from accelerate.utils import set_seed

    import train_ldm_only
    from dataset.h5 import ImageLatentDataset
    from training.guard import NonFiniteGuard

    targs = train_ldm_only.build_parser().parse_args(training_argv(
        args, args.data_dir, ["--vae-ckpt", args.vae_file, "--vae-latents-name", "bench-vae"]))
    accelerator = accelerator_for(args)
    set_seed(0)
    nets, _, _, _, loader, _ = train_ldm_only.build(targs, accelerator, ImageLatentDataset(args.data_dir, "bench-vae"))
    raw_image, moments, labels = (t.to(accelerator.device) for t in next(iter(loader)))
    guard = NonFiniteGuard()
    loss_kwargs = dict(path_type=targs.path_type, prediction=targs.prediction, weighting=targs.weighting)

    def run():
        train_ldm_only.ldm_step(nets, raw_image, moments, labels, accelerator, guard, loss_kwargs=loss_kwargs,
                                proj_coeff=targs.proj_coeff, max_grad_norm=targs.max_grad_norm,
                                ema_decay=targs.ema_decay)

    return measure({"default": run}, args, "LDM-only step + EMA")


def print_profile(args):
    """torch.profiler's operators of one REPA-E step (after a warm-up step), busiest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    args.configs = "default"
    step_fn = repae_steps(args)["default"]
    step_fn()
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step_fn()
        harness.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=20, max_name_column_width=50))


def child_argv(args, row, data_dir, vae_file):
    """This script's flags for the child process that measures `row`."""
    argv = ["--resolution", args.resolution, "--batch-size", args.batch_size, "--model", args.model, "--vae",
            args.vae, "--enc-type", args.enc_type, "--encoder-depth", args.encoder_depth, "--mixed-precision",
            args.mixed_precision, "--configs", args.configs if row == "repae" else "default", "--warmup",
            args.warmup, "--repeats", args.repeats, "--work-dir", args.work_dir, "--child", row, "--data-dir",
            data_dir, "--vae-file", vae_file, "--compile" if args.compile else "--no-compile"]
    if args.grad_checkpointing:
        argv.append("--grad-checkpointing")
    return [str(a) for a in argv]


def collect_rows(args):
    """All rows, each training step in a fresh process."""
    rows, row_kinds = [], args.rows.split(",")
    data_dir, vae_file = harness.make_bench_data(Path(args.work_dir), resolution=args.resolution,
                                                 images=max(16, 4 * args.batch_size), vae=args.vae,
                                                 latents="ldm" in row_kinds)
    for row in row_kinds:
        rows += harness.run_child(Path(__file__), child_argv(args, row, data_dir, vae_file))
    return rows


def main(argv=None):
    """Print the table (parent) or measure one row kind and hand it back (child)."""
    args = build_parser().parse_args(argv)
    if not set(args.configs.split(",")) <= set(CONFIGS):
        sys.exit(f"--configs takes a comma list of {', '.join(CONFIGS)}")
    if args.child:
        harness.emit(repae_rows(args) if args.child == "repae" else ldm_rows(args))
        return
    if args.profile:
        args.data_dir, _ = harness.make_bench_data(Path(args.work_dir), resolution=args.resolution,
                                                   images=max(16, 4 * args.batch_size), vae=args.vae)
        print_profile(args)
        print(f"command: python bench/bench_step.py {' '.join(sys.argv[1:] if argv is None else argv)}")
        return
    rows = collect_rows(args)
    harness.print_table("training steps (train_repae.repae_step, train_ldm_only.ldm_step)", rows)
    print(f"command: python bench/bench_step.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    medians = {row["name"]: statistics.median(row["times"]) for row in rows}
    default, loop = "REPA-E step + EMA [default]", "REPA-E step + EMA [loop-adamw-vae-ckpt]"
    if default in medians and loop in medians:
        print(f"REPA-E step speed-up, loop-adamw-vae-ckpt -> default: {medians[loop] / medians[default]:.2f}x")


if __name__ == "__main__":
    main()
