"""What an evaluation during training costs: seconds per 1,000 samples of the trainers' GenerationEvaluator (sampling
with generate.py's stream, VAE decoding, Inception and DINOv2 features), and the fixed cost of the numbers (the
Frechet distances' matrix square roots, whatever the number of samples).

    python bench/bench_eval.py                                  # SiT-T/2 + f8d4-tiny at 32 px, K=64, batch 32
    python bench/bench_eval.py --model SiT-B/2 --vae f8d4 --resolution 128 --num-samples 256

Random weights throughout (the cost does not depend on them; DINOv2 is the ViT-L/14 of FD-DINOv2 unless
--metrics leaves fd_dinov2 out); ODE sampler at generate.py's defaults (50 steps, CFG 1.5). Compare the figures
with bench/bench_step.py's step time at the same configuration.
"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import harness  # noqa: E402


def build_parser():
    """The bench's flags."""
    parser = harness.bench_parser(__doc__, "timed evaluations")
    parser.add_argument("--model", default="SiT-T/2", help="SiT size")
    parser.add_argument("--vae", default="f8d4-tiny", help="VAE layout")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    parser.add_argument("--num-samples", type=int, default=64, help="K: samples per evaluation")
    parser.add_argument("--batch-size", type=int, default=32, help="--eval-batch-size")
    parser.add_argument("--num-steps", type=int, default=50, help="--eval-steps")
    parser.add_argument("--metrics", default="is,fid,sfid,fd_dinov2", help="--eval-metrics")
    parser.set_defaults(repeats=1)
    return parser


def main(argv=None):
    """Time the evaluator's sampling and features, then its numbers, and print the table."""
    args = build_parser().parse_args(argv)
    import numpy as np
    import torch
    from accelerate import Accelerator

    from evaluation.features import compute_metrics
    from models.autoencoder import latent_shape, vae_models
    from models.sit import build_sit
    from sampling.generation import sample_batches
    from training.evaluator import GenerationEvaluator
    from weights.latent_stats import latent_decoder

    torch.manual_seed(0)
    work = tempfile.TemporaryDirectory()
    reference = Path(work.name) / "reference.npz"  # an ADM-style batch: its statistics come from its images
    np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (4, args.resolution, args.resolution, 3),
                                                                 dtype=np.uint8))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    metrics = args.metrics.split(",")
    evaluator = GenerationEvaluator(
        accelerator, reference=reference, resolution=args.resolution, num_samples=args.num_samples,
        batch_size=args.batch_size, seed=0, sampler="ode", num_steps=args.num_steps, cfg_scale=1.5, metrics=metrics,
        inception_weights=None, inception_random_init=True, dinov2_weights=None, dinov2_random_init=True)
    vae = vae_models[args.vae]().to(accelerator.device).eval()
    shape = latent_shape(vae, args.resolution)
    sit = build_sit(args.model, shape, [768], num_classes=1000, cfg_prob=0.1, encoder_depth=1).to(
        accelerator.device).eval()
    stats = {"latents_scale": torch.ones(1, shape[0], 1, 1, device=accelerator.device),
             "latents_bias": torch.zeros(1, shape[0], 1, 1, device=accelerator.device)}

    # the evaluator's parts on its own stream: sampling + decoding, then each feature network, then the numbers
    sampling = dict(evaluator.sampling)
    images = []

    def sample():
        images[:] = [batch for _, batch in sample_batches(sit, latent_decoder(vae, stats), shape,
                                                          path_type="linear", **sampling)]

    times = {"sampling + decoding": harness.time_calls(sample, args.repeats)}
    networks = {"inception": ["pool", "spatial", "probs"], "dinov2": ["dinov2"]}
    gathered = {}
    for network, wanted in networks.items():
        wanted = [feature for feature in wanted if feature in evaluator.extractor.features]
        if wanted:
            times[f"{network} features"] = harness.time_calls(
                lambda wanted=wanted: gathered.update(evaluator.extractor.extract(images, wanted)), args.repeats)
    started = time.perf_counter()
    compute_metrics({name: values[:args.num_samples] for name, values in gathered.items()}, evaluator.reference,
                    evaluator.metrics, accelerator.device)
    numbers = time.perf_counter() - started
    config = (f"{args.model} {args.vae} {args.resolution}px K={args.num_samples} b{args.batch_size} "
              f"ode {args.num_steps} steps cfg 1.5")
    rate = harness.matmul_rate()
    rows = [dict(name=f"{part}, s per 1000 samples", config=config, unit="ms", items=1, device=harness.device_name(),
                 times=[t / args.num_samples for t in part_times], matmul_flops=rate)
            for part, part_times in times.items()]
    rows.append(dict(name="the numbers (Frechet distances), s, once", config=",".join(evaluator.metrics), unit="ms",
                     items=1, times=[numbers / 1000], device=harness.device_name(), matmul_flops=rate))
    harness.print_table("evaluation during training (training.evaluator.GenerationEvaluator)", rows)
    per_1000 = sum(1000 * sum(part_times) / len(part_times) / args.num_samples for part_times in times.values())
    print(f"an evaluation of K samples: {per_1000:.0f} s per 1,000 samples + {numbers:.0f} s for the numbers")
    print(f"command: python bench/bench_eval.py {' '.join(sys.argv[1:] if argv is None else argv)}")


if __name__ == "__main__":
    main()
