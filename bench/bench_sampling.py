"""Sampling throughput (images/s) of utils.samplers, the functions generate.py calls, at generate.py's settings:
the SDE (250 steps, CFG 1.0) and the ODE (50 steps, CFG 1.8 with the guidance interval [0, 0.7]).

    python bench/bench_sampling.py                          # SiT-T/2 on 8x8 latents, batch 8
    python bench/bench_sampling.py --model SiT-B/2 --latent-size 16 --batch-size 16
    python bench/bench_sampling.py --reference 0483900      # also the samplers of a git revision, timed alternately
    python bench/bench_sampling.py --compile                # also generate.py --compile's model, timed alternately

Random SiT weights (the cost of a call does not depend on them); each row runs in a fresh process. Images/s
counts the sampler only (no VAE decoding, no PNG writing). With --reference the revision's utils/samplers.py
(read with `git show`) is timed alternately with the current one on the same inputs, and the bench checks that
both give the same samples. With --compile a copy of the model whose inference is compiled as `generate.py
--compile` does (utils.samplers.compile_inference; compilation happens in the untimed first call) is timed
alternately with the eager one; its row reports the largest difference of its samples from the eager ones and
the seconds of that first call.
"""
import argparse
import copy
import functools
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import harness  # noqa: E402

SETTINGS = {
    "sde": dict(num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0),
    "ode": dict(num_steps=50, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7),
}


def make_parser():
    """The bench's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-T/2", help="SiT size")
    parser.add_argument("--latent-size", type=int, default=8, help="latent side (16 for 128 px with f8d4)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampler call")
    parser.add_argument("--modes", default="ode,sde", help="comma list of ode,sde")
    parser.add_argument("--reference", default=None, help="git revision whose samplers are timed alternately")
    parser.add_argument("--compile", action="store_true", help="also time the compiled model alternately")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per sampler")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per sampler")
    parser.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    return parser


def samplers_at(revision):
    """utils/samplers.py as it was at a git revision, as a module."""
    source = subprocess.run(["git", "show", f"{revision}:utils/samplers.py"], capture_output=True, text=True,
                            cwd=harness.ROOT, check=True).stdout
    module = types.ModuleType(f"samplers_{revision}")
    exec(compile(source, f"{revision}:utils/samplers.py", "exec"), module.__dict__)
    return module


def sampler_rows(args):
    """Rows of one mode's sampler (and the reference's), timed alternately in this process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.sit import SiT_models
    from utils import samplers

    torch.manual_seed(0)
    model = SiT_models[args.model](input_size=args.latent_size, num_classes=1000, z_dims=[768],
                                   encoder_depth=1).eval()
    latents = torch.randn(args.batch_size, model.in_channels, args.latent_size, args.latent_size)
    labels = torch.randint(0, 1000, (args.batch_size,))
    versions = {"current": (samplers, model)}
    if args.reference:
        versions[args.reference] = (samplers_at(args.reference), model)
    if args.compile:
        versions["compiled"] = (samplers, samplers.compile_inference(copy.deepcopy(model)))
    name = "euler_maruyama_sampler" if args.child == "sde" else "euler_sampler"
    settings = SETTINGS[args.child]

    def call(version):
        module, sampled_model = versions[version]
        torch.manual_seed(1)
        return getattr(module, name)(sampled_model, latents, labels, **settings)

    outputs, first_call = {}, {}
    for version in versions:
        first_call[version] = time.perf_counter()
        outputs[version] = call(version)
        first_call[version] = time.perf_counter() - first_call[version]
    if args.reference and not torch.equal(outputs[args.reference], outputs["current"]):
        sys.exit(f"{args.child}: the reference samplers give other samples than the current ones")
    notes = {version: "" for version in versions}
    if args.compile:
        notes["compiled"] = (f" max|compiled-eager|={(outputs['compiled'] - outputs['current']).abs().max():.3g}"
                             f" first call (compiling) {first_call['compiled']:.0f} s")
    counted = {}
    for version in versions:
        with harness.count_host_reads() as reads, FlopCounterMode(display=False) as mode:
            call(version)
        counted[version] = dict(flops=mode.get_total_flops(), host_reads=reads["reads"])
    for version in versions:
        for _ in range(args.warmup):
            call(version)
    times, rates = {version: [] for version in versions}, []
    for _ in range(args.repeats):
        for version in versions:
            times[version] += harness.time_calls(functools.partial(call, version), 1)
        rates.append(harness.matmul_rate())
    rate = statistics.median(rates)
    config = (f"{args.model} {args.latent_size}x{args.latent_size} latents b{args.batch_size} "
              + " ".join(f"{k}={v}" for k, v in settings.items()))
    peak = harness.peak_memory_mib() if len(versions) == 1 else None
    return [dict(name=f"{args.child.upper()} sampler [{version}]", config=config + notes[version], unit="img/s",
                 items=args.batch_size, times=times[version], peak_mib=peak, matmul_flops=rate,
                 device=harness.device_name(), **counted[version]) for version in versions]


def main(argv=None):
    """Print the table (parent) or measure one mode and hand it back (child)."""
    args = make_parser().parse_args(argv)
    if args.child:
        harness.emit(sampler_rows(args))
        return
    rows = []
    for mode in args.modes.split(","):
        child = ["--model", args.model, "--latent-size", args.latent_size, "--batch-size", args.batch_size,
                 "--warmup", args.warmup, "--repeats", args.repeats, "--child", mode]
        if args.reference:
            child += ["--reference", args.reference]
        if args.compile:
            child.append("--compile")
        rows += harness.run_child(Path(__file__), [str(a) for a in child])
    harness.print_table("sampling (utils.samplers, as generate.py calls them)", rows)
    print(f"command: python bench/bench_sampling.py {' '.join(sys.argv[1:] if argv is None else argv)}")


if __name__ == "__main__":
    main()
