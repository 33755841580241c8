"""Sampling throughput (images/s) of sampling.samplers, the functions generate.py calls, at generate.py's settings:
the SDE (250 steps, CFG 1.0) and the ODE (50 steps, CFG 1.8 with the guidance interval [0, 0.7]).

    python bench/bench_sampling.py                          # SiT-T/2 on 8x8 latents, batch 8
    python bench/bench_sampling.py --model SiT-B/2 --latent-size 16 --batch-size 16
    python bench/bench_sampling.py --compile                # also generate.py --compile's model, timed alternately

Random SiT weights (the cost of a call does not depend on them); each row runs in a fresh process. Images/s
counts the sampler only (no VAE decoding, no PNG writing). With --compile a copy of the model whose inference is
compiled as `generate.py --compile` does (sampling.samplers.compile_inference; compilation happens in the untimed
first call) is timed alternately with the eager one; its row reports the largest difference of its samples from
the eager ones and the seconds of that first call.
"""
import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import harness  # noqa: E402
from utils.host_reads import count_host_reads  # noqa: E402

SETTINGS = {
    "sde": dict(num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0),
    "ode": dict(num_steps=50, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7),
}


def build_parser():
    """The bench's flags."""
    parser = harness.bench_parser(__doc__, "timed calls per sampler")
    parser.add_argument("--model", default="SiT-T/2", help="SiT size")
    parser.add_argument("--latent-size", type=int, default=8, help="latent side (16 for 128 px with f8d4)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampler call")
    parser.add_argument("--modes", default="ode,sde", help="comma list of ode,sde")
    parser.add_argument("--compile", action="store_true", help="also time the compiled model alternately")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per sampler")
    parser.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    return parser


def sampler_rows(args):
    """Rows of one mode's sampler on the eager model (and on the compiled one), timed alternately in this process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.sit import SiT_models
    from sampling import samplers

    torch.manual_seed(0)
    model = SiT_models[args.model](input_size=args.latent_size, num_classes=1000, z_dims=[768],
                                   encoder_depth=1).eval()
    latents = torch.randn(args.batch_size, model.in_channels, args.latent_size, args.latent_size)
    labels = torch.randint(0, 1000, (args.batch_size,))
    models = {"eager": model}
    if args.compile:
        models["compiled"] = samplers.compile_inference(copy.deepcopy(model))
    sampler = samplers.euler_maruyama_sampler if args.child == "sde" else samplers.euler_sampler
    settings = SETTINGS[args.child]

    def call(kind):
        torch.manual_seed(1)
        return sampler(models[kind], latents, labels, **settings)

    outputs, first_call = {}, {}
    for kind in models:
        first_call[kind] = time.perf_counter()
        outputs[kind] = call(kind)
        first_call[kind] = time.perf_counter() - first_call[kind]
    notes = {kind: "" for kind in models}
    if args.compile:
        notes["compiled"] = (f" max|compiled-eager|={(outputs['compiled'] - outputs['eager']).abs().max():.3g}"
                             f" first call (compiling) {first_call['compiled']:.0f} s")
    counted = {}
    for kind in models:
        with count_host_reads() as reads, FlopCounterMode(display=False) as mode:
            call(kind)
        counted[kind] = dict(flops=mode.get_total_flops(), host_reads=reads["reads"])
    for kind in models:
        for _ in range(args.warmup):
            call(kind)
    times, rates = {kind: [] for kind in models}, []
    for _ in range(args.repeats):
        for kind in models:
            times[kind] += harness.time_calls(functools.partial(call, kind), 1)
        rates.append(harness.matmul_rate())
    rate = statistics.median(rates)
    config = (f"{args.model} {args.latent_size}x{args.latent_size} latents b{args.batch_size} "
              + " ".join(f"{k}={v}" for k, v in settings.items()))
    peak = harness.peak_memory_mib() if len(models) == 1 else None
    return [dict(name=f"{args.child.upper()} sampler [{kind}]", config=config + notes[kind], unit="img/s",
                 items=args.batch_size, times=times[kind], peak_mib=peak, matmul_flops=rate,
                 device=harness.device_name(), **counted[kind]) for kind in models]


def main(argv=None):
    """Print the table (parent) or measure one mode and hand it back (child)."""
    args = build_parser().parse_args(argv)
    if args.child:
        harness.emit(sampler_rows(args))
        return
    rows = []
    for mode in args.modes.split(","):
        child = ["--model", args.model, "--latent-size", args.latent_size, "--batch-size", args.batch_size,
                 "--warmup", args.warmup, "--repeats", args.repeats, "--child", mode]
        if args.compile:
            child.append("--compile")
        rows += harness.run_child(Path(__file__), [str(a) for a in child])
    harness.print_table("sampling (sampling.samplers, as generate.py calls them)", rows)
    print(f"command: python bench/bench_sampling.py {' '.join(sys.argv[1:] if argv is None else argv)}")


if __name__ == "__main__":
    main()
