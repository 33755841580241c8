"""Score generated samples against a reference: Inception Score, FID, sFID, precision, recall and FD-DINOv2.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples/NAME.npz --json samples/NAME.json
    python evaluate.py imagenet256_stats.npz samples/NAME.npz --metrics fid,fd_dinov2

The numbers of the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py), without TensorFlow: the same
Inception graph (torch-fidelity's port), the same features and the same formulas (see evaluation/); FD-DINOv2 as
NVlabs/edm2 computes it (the DINOv2 ViT-L/14 class token of 224-px inputs, evaluation/dinov2.py).
REF is an ADM reference batch (`arr_0` uint8 NHWC images; its precomputed `mu`, `sigma`, `mu_s`, `sigma_s`, when
present, are used as they are) or a statistics file reference_stats.py wrote (no images: no precision and recall);
SAMPLES is the .npz generate.py writes. Both are read a batch at a time. The features go through
evaluation.features, as a training loop's do: the same images in the same batches give the same numbers.
"""
import argparse
import sys

from evaluation.flags import (
    METRICS,
    add_dinov2_flags,
    add_inception_flags,
    add_metrics_flag,
    add_output_flags,
    resolve_device,
)
from utils.cli import HelpFormatter, positive_int
from utils.errors import UserError, report_user_errors


def build_parser():
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("ref_batch", type=str,
                        help="reference: an ADM reference batch .npz (arr_0 uint8 NHWC, optional mu/sigma/...) or the "
                             "statistics file reference_stats.py writes")
    parser.add_argument("sample_batch", type=str, help="sample batch .npz (arr_0 uint8 NHWC), as generate.py writes")
    add_metrics_flag(parser, list(METRICS),
                     "all; fd_dinov2 only when the DINOv2 weights are on this machine (or --dinov2-weights or "
                     "--dinov2-random-init is given), precision and recall only when REF holds images")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="images per network forward (the ADM's 64)")
    add_output_flags(parser)
    add_inception_flags(parser, "IS, FID, sFID, precision and recall are")
    add_dinov2_flags(parser)
    return parser


def evaluate(args):
    """Compute the metrics; returns them as a dict with the image counts and the weights used."""
    from evaluation.features import FeatureExtractor, choose_metrics, compute_metrics
    from evaluation.npz import NpzImages
    from evaluation.reference import ReferenceStatistics, check_reference

    reference = ReferenceStatistics.load(args.ref_batch)
    samples = NpzImages(args.sample_batch)
    if reference.images is not None and reference.images.shape[1:] != samples.shape[1:]:
        raise UserError(f"{args.ref_batch} holds {reference.images.shape[1:]} images but {args.sample_batch} "
                        f"{samples.shape[1:]}: score samples against the reference batch of their resolution")
    metrics, notes = choose_metrics(args.metrics, reference, offered=list(METRICS),
                                    dinov2_given=bool(args.dinov2_weights or args.dinov2_random_init))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    device = resolve_device(args.device)
    extractor = FeatureExtractor(metrics, device, args.inception_weights, args.inception_random_init,
                                 args.dinov2_weights, args.dinov2_random_init)
    check_reference(reference, samples.resolution, extractor)
    reference.prepare(extractor, args.batch_size, desc="reference batch")
    features = extractor.extract(samples.batches(args.batch_size), total=-(-len(samples) // args.batch_size),
                                 desc="sample batch")
    for warning in extractor.covariance_warnings(len(samples)):
        print(f"warning: {warning}", file=sys.stderr)
    results = compute_metrics(features, reference, metrics, device)
    results.update(num_ref=reference.num_images, num_samples=len(samples))
    results.update({f"{network}_weights": weights for network, weights in extractor.weights().items()})
    return results


def main(argv=None):
    """Parse flags, evaluate, print as the ADM evaluator does, write --json; returns the numbers."""
    args = build_parser().parse_args(argv)
    from evaluation.features import RESULT_KEYS, TITLES
    from evaluation.report import report_results

    results = evaluate(args)
    lines = [f"{TITLES[metric]}: {results[key]}" for metric, key in RESULT_KEYS.items() if key in results]
    smoke_tests = []
    if args.inception_random_init and "inception_weights" in results:
        smoke_tests.append("random Inception weights: IS, FID, sFID, precision and recall are")
    if args.dinov2_random_init and "dinov2_weights" in results:
        smoke_tests.append("random DINOv2 weights: FD-DINOv2 is")
    report_results("\n".join(lines), results, json_path=args.json, smoke_tests=smoke_tests)
    return results


if __name__ == "__main__":
    report_user_errors(main)()
