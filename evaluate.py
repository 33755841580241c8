"""Score generated samples against an ADM reference batch: Inception Score, FID, sFID, precision and recall.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples/NAME.npz --json samples/NAME.json

The numbers of the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py), without TensorFlow: the same
Inception graph (torch-fidelity's port), the same features and the same formulas (see evaluation/).
REF is an ADM reference batch (`arr_0` uint8 NHWC images; its precomputed `mu`, `sigma`, `mu_s`, `sigma_s`, when
present, are used as they are); SAMPLES is the .npz generate.py writes. Both are read a batch at a time.
"""
import argparse

from evaluation.flags import add_inception_flags, add_output_flags, resolve_device
from utils.cli import HelpFormatter, positive_int
from utils.errors import UserError, report_user_errors

REF_STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def build_parser():
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("ref_batch", type=str, help="reference batch .npz (arr_0 uint8 NHWC, optional mu/sigma/...)")
    parser.add_argument("sample_batch", type=str, help="sample batch .npz (arr_0 uint8 NHWC), as generate.py writes")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="images per Inception forward (the ADM's 64)")
    add_output_flags(parser)
    add_inception_flags(parser, "the numbers are")
    return parser


def read_reference_statistics(path):
    """The precomputed (mu, sigma), (mu_s, sigma_s) of a reference batch, or None when it holds none."""
    import numpy as np

    with np.load(path) as npz:
        present = [key for key in REF_STATS_KEYS if key in npz.files]
        if not present:
            return None
        if len(present) < len(REF_STATS_KEYS):
            missing = ", ".join(key for key in REF_STATS_KEYS if key not in present)
            raise UserError(f"{path} holds only some precomputed statistics (no {missing}): "
                             "give all of mu, sigma, mu_s, sigma_s or none")
        return (npz["mu"], npz["sigma"]), (npz["mu_s"], npz["sigma_s"])


def compute_activations(net, images, batch_size, desc):
    """(pool, spatial, softmax) arrays of every image of an NpzImages, with a progress bar."""
    import numpy as np
    from tqdm import tqdm

    outputs = [net.activations(batch) for batch in tqdm(images.batches(batch_size), desc=desc,
                                                         total=-(-len(images) // batch_size), unit="batch")]
    return tuple(np.concatenate(parts) for parts in zip(*outputs))


def evaluate(args):
    """Compute the five numbers; returns them as a dict."""
    import torch

    from evaluation.inception import build_inception
    from evaluation.metrics import fid_statistics, frechet_distance, inception_score, precision_recall
    from evaluation.npz import NpzImages

    ref_images, sample_images = NpzImages(args.ref_batch), NpzImages(args.sample_batch)
    if ref_images.shape[1:] != sample_images.shape[1:]:
        raise UserError(f"{args.ref_batch} holds {ref_images.shape[1:]} images but {args.sample_batch} "
                         f"{sample_images.shape[1:]}: score samples against the reference batch of their resolution")
    ref_statistics = read_reference_statistics(args.ref_batch)
    device = resolve_device(args.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 features, as TF's
    net = build_inception(args.inception_weights, args.inception_random_init, device)

    ref_pool, ref_spatial, _ = compute_activations(net, ref_images, args.batch_size, "reference batch")
    if ref_statistics is None:
        ref_statistics = fid_statistics(ref_pool), fid_statistics(ref_spatial)
    pool, spatial, probs = compute_activations(net, sample_images, args.batch_size, "sample batch")
    precision, recall = precision_recall(ref_pool, pool, device=device)
    return {
        "inception_score": inception_score(probs),
        "fid": frechet_distance(*fid_statistics(pool), *ref_statistics[0]),
        "sfid": frechet_distance(*fid_statistics(spatial), *ref_statistics[1]),
        "precision": precision,
        "recall": recall,
        "num_ref": len(ref_images),
        "num_samples": len(sample_images),
        "inception_weights": "random" if args.inception_random_init else str(net.weights_path),
    }


def main(argv=None):
    """Parse flags, evaluate, print as the ADM evaluator does, write --json; returns the numbers."""
    args = build_parser().parse_args(argv)
    from evaluation.report import report_results

    results = evaluate(args)
    lines = [f"{name}: {results[key]}" for name, key in [("Inception Score", "inception_score"), ("FID", "fid"),
                                                          ("sFID", "sfid"), ("Precision", "precision"),
                                                          ("Recall", "recall")]]
    report_results("\n".join(lines), results, json_path=args.json,
                   smoke_tests=["random Inception weights: these numbers are"] if args.inception_random_init else [])
    return results


if __name__ == "__main__":
    report_user_errors(main)()
