"""Reference statistics of real images for evaluate.py and the training loop: the ADM reference batch's mu, sigma,
mu_s, sigma_s and FD-DINOv2's mu_dinov2, sigma_dinov2, in one .npz.

    python reference_stats.py data imagenet256_stats.npz                                 # DATA/images.h5
    python reference_stats.py /data/imagenet/val imagenet256_stats.npz --resolution 256  # image files, ADM crop
    python reference_stats.py VIRTUAL_imagenet256_labeled.npz imagenet256_stats.npz     # an .npz batch (arr_0)

SOURCE is a data folder holding images.h5 (preprocessing.py), a folder of image files (each center-cropped to
--resolution as preprocessing.py crops it, in the order it lists them), or an .npz whose arr_0 holds uint8 NHWC
images. The features are evaluate.py's (evaluation.features), and the statistics are np.mean and np.cov of them, as
the ADM evaluator computes a reference batch's. The file also records the source, the image count, the resolution
and the sha256 of each feature network's weights file ("random" for random weights); evaluate.py and the trainer
refuse it for images of another resolution or with other weights. It holds no images, so evaluate.py computes every
metric from it but precision and recall.
"""
import argparse
import sys
from pathlib import Path

from evaluation.flags import (
    add_device_flag,
    add_dinov2_flags,
    add_inception_flags,
    add_metrics_flag,
    resolve_device,
)
from utils.cli import HelpFormatter, non_negative_int, positive_int
from utils.errors import UserError, report_user_errors

FRECHET_METRICS = ["fid", "sfid", "fd_dinov2"]


def build_parser():
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("source", type=str,
                        help="a data folder holding images.h5, a folder of image files, or an .npz (arr_0 uint8 NHWC)")
    parser.add_argument("output", type=str, help="the statistics .npz to write")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="side of the center crop of a folder of image files (needed for one); for images.h5 or "
                             "an .npz, when given, it must be their size")
    add_metrics_flag(parser, FRECHET_METRICS,
                     "fid and sfid, and fd_dinov2 when the DINOv2 weights are on this machine (or --dinov2-weights or "
                     "--dinov2-random-init is given); fid and sfid each write all of mu, sigma, mu_s, sigma_s")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per network forward")
    parser.add_argument("--num-workers", type=non_negative_int, default=4,
                        help="DataLoader workers reading images.h5 or the image files")
    add_device_flag(parser)
    add_inception_flags(parser, "mu, sigma, mu_s and sigma_s are")
    add_dinov2_flags(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def choose_metrics(args):
    """The metrics whose statistics to compute: --metrics, else fid and sfid, and fd_dinov2 when its weights are on this
    machine (a printed note otherwise). fid and sfid go together: the ADM statistics are all four or none."""
    metrics = args.metrics
    if metrics is None:
        from evaluation.dinov2 import dinov2_weights_path

        metrics = FRECHET_METRICS
        if not (args.dinov2_weights or args.dinov2_random_init):
            try:
                dinov2_weights_path(fetch=False)
            except FileNotFoundError as error:
                print(f"note: no FD-DINOv2 statistics: {error}", file=sys.stderr)
                metrics = ["fid", "sfid"]
    if {"fid", "sfid"} & set(metrics):
        metrics = ["fid", "sfid", *[metric for metric in metrics if metric == "fd_dinov2"]]
    return metrics


def main(argv=None):
    """Parse flags, compute the statistics of the source's images, write them atomically; returns the output path."""
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} already exists; pass --overwrite to replace it")
    from evaluation.features import FeatureExtractor
    from evaluation.reference import STATISTICS_KEYS, ReferenceStatistics
    from evaluation.sources import open_images

    images = open_images(args.source, args.resolution, args.num_workers)
    if len(images) < 2:
        raise UserError(f"{args.source} holds {len(images)} image(s): statistics need 2 or more")
    metrics = choose_metrics(args)
    extractor = FeatureExtractor(metrics, resolve_device(args.device), args.inception_weights,
                                 args.inception_random_init, args.dinov2_weights, args.dinov2_random_init)
    for warning in extractor.covariance_warnings(len(images), what="images"):
        print(f"warning: {warning}", file=sys.stderr)
    features = extractor.extract(images.batches(args.batch_size), total=-(-len(images) // args.batch_size),
                                 desc="reference images")
    reference = ReferenceStatistics.from_features(features, Path(args.source).resolve(), images.resolution,
                                                  extractor.weights_sha256())
    reference.save(output)
    keys = [key for feature in reference.statistics for key in STATISTICS_KEYS[feature]]
    print(f"Wrote {output}: {', '.join(keys)} of {reference.num_images} {reference.resolution}-px images")
    return output


if __name__ == "__main__":
    report_user_errors(main)()
