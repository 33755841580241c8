"""From images to the evaluation numbers along one code path: evaluate.py, reference_stats.py and a training loop.

- FeatureExtractor, built once for a set of metrics (the --metrics names of evaluation.flags.METRICS), maps uint8
  (B, H, W, 3) image batches, torch or numpy, to the features those metrics need: the Inception `pool` (2048 values),
  `spatial` (2023) and class `probs` (1008) of evaluation/inception.py, and the DINOv2 class token `dinov2` (1024)
  of evaluation/dinov2.py, as float32 numpy arrays.
- compute_metrics turns the concatenated features of all samples and a ReferenceStatistics (evaluation/reference.py)
  into the numbers, with the ADM evaluator's formulas (evaluation/metrics.py).
- full_rank_warning says whether K samples give a full-rank covariance of D-dimensional features.

The same images in the same batches on the same device give the same bits whoever feeds them: each batch is made a
contiguous NHWC tensor first (a view of another layout would run other kernels), and the networks run in float32 with
TF32, autocast and cuDNN benchmarking off, whatever the caller has enabled (a trainer's mixed precision included).
"""
import contextlib
import hashlib

import numpy as np
import torch
from tqdm import tqdm

from evaluation.dinov2 import build_dinov2, dinov2_weights_path
from evaluation.flags import METRICS
from evaluation.inception import build_inception
from evaluation.metrics import fid_statistics, frechet_distance, inception_score, precision_recall
from utils.errors import UserError

# The feature each metric is computed from, and the network that gives each feature.
METRIC_FEATURES = {"is": "probs", "fid": "pool", "sfid": "spatial", "precision": "pool", "recall": "pool",
                   "fd_dinov2": "dinov2"}
FEATURE_NETWORKS = {"pool": "inception", "spatial": "inception", "probs": "inception", "dinov2": "dinov2"}
INCEPTION_FEATURES = ("pool", "spatial", "probs")  # the order of InceptionV3.activations
FRECHET_METRICS = ("fid", "sfid", "fd_dinov2")  # a Frechet distance of their feature's (mean, covariance)
# How the numbers are named in results and printed.
RESULT_KEYS = {"is": "inception_score", "fid": "fid", "sfid": "sfid", "precision": "precision", "recall": "recall",
               "fd_dinov2": "fd_dinov2"}
TITLES = {"is": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision", "recall": "Recall",
          "fd_dinov2": "FD-DINOv2"}
INCEPTION_DIMS = {"pool": 2048, "spatial": 2023}


@contextlib.contextmanager
def full_float32(device_type):
    """Inside: float32 matmuls and convolutions without TF32 or bfloat16, deterministic cuDNN algorithms (not
    benchmarked ones, which may differ from run to run), and no autocast; the caller's settings come back after.

    Each backend's precision is read and set on its own: torch.get_float32_matmul_precision() raises once a program
    has set precisions through both of torch's interfaces (set_float32_matmul_precision, then allow_tf32)."""
    backends, cudnn = torch.backends, torch.backends.cudnn
    precisions = [backends.cuda.matmul, cudnn.conv, cudnn.rnn, backends.mkldnn.matmul, backends.mkldnn.conv,
                  backends.mkldnn.rnn]
    saved = [backend.fp32_precision for backend in precisions], cudnn.benchmark, cudnn.deterministic
    for backend in precisions:
        backend.fp32_precision = "ieee"
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        for backend, precision in zip(precisions, saved[0]):
            backend.fp32_precision = precision
        cudnn.benchmark, cudnn.deterministic = saved[1:]


def file_sha256(path):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def full_rank_warning(count, dim, title="FID", what="samples"):
    """None when `count` features of dim values can have a full-rank covariance (count >= dim + 1), else the
    one-line warning to print; `what` names the images counted."""
    if count > dim:
        return None
    return (f"{title} of {count} {what} may use the ADM evaluator's fallback (their {dim}x{dim} covariance is "
            f"singular); {dim + 1} or more {what} give a full-rank covariance")


class FeatureExtractor:
    """The feature networks of a set of metrics, built once: uint8 (B, H, W, 3) images -> {feature: (B, D) array}.

    metrics: --metrics names (evaluation.flags.METRICS); the weights arguments are those of build_inception and
    build_dinov2 (a network no metric needs is not built).
    """

    def __init__(self, metrics, device="cpu", inception_weights=None, inception_random_init=False,
                 dinov2_weights=None, dinov2_random_init=False):
        unknown = [metric for metric in metrics if metric not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
        self.metrics = [metric for metric in METRICS if metric in metrics]
        self.features = list(dict.fromkeys(METRIC_FEATURES[metric] for metric in self.metrics))
        self.device = torch.device(device)
        networks = {FEATURE_NETWORKS[feature] for feature in self.features}
        self.networks = {}
        if "inception" in networks:
            self.networks["inception"] = build_inception(inception_weights, inception_random_init, self.device)
        if "dinov2" in networks:
            self.networks["dinov2"] = build_dinov2(dinov2_weights, dinov2_random_init, self.device)
        self._sha256 = {}

    def __call__(self, images, features=None):
        """{feature: float32 numpy (B, D)} of a uint8 (B, H, W, 3) batch, torch or numpy, for every feature of the
        metrics, or only for those named in `features`."""
        features = self.features if features is None else list(features)
        if not set(features) <= set(self.features):
            raise ValueError(f"features {features}: this extractor computes {self.features}")
        images = torch.as_tensor(images).to(self.device).contiguous()
        out = {}
        with torch.no_grad(), full_float32(self.device.type):
            if any(FEATURE_NETWORKS[feature] == "inception" for feature in features):
                out.update(zip(INCEPTION_FEATURES, self.networks["inception"].activations(images)))
            if "dinov2" in features:
                out["dinov2"] = self.networks["dinov2"].features(images)
        return {feature: out[feature] for feature in features}

    def extract(self, batches, features=None, total=None, desc=None):
        """The features of every batch of an iterable, concatenated; a progress bar named desc when one is given."""
        parts = [self(batch, features) for batch in tqdm(batches, desc=desc, total=total, unit="batch",
                                                         disable=desc is None)]
        return {feature: np.concatenate([part[feature] for part in parts]) for feature in parts[0]}

    def weights(self):
        """{network: its weights file, or "random"} of the networks in use."""
        return {name: "random" if net.weights_path is None else str(net.weights_path)
                for name, net in self.networks.items()}

    def weights_sha256(self):
        """{network: sha256 of its weights file, or "random"} of the networks in use (each file is read once)."""
        for name, path in self.weights().items():
            if name not in self._sha256:
                self._sha256[name] = "random" if path == "random" else file_sha256(path)
        return dict(self._sha256)

    def covariance_warnings(self, count, what="samples"):
        """full_rank_warning of each Frechet metric of the extractor for `count` images, the Nones left out."""
        dims = {**INCEPTION_DIMS, "dinov2": self.networks["dinov2"].encoder.num_features
                if "dinov2" in self.networks else None}
        warnings = [full_rank_warning(count, dims[METRIC_FEATURES[metric]], TITLES[metric], what)
                    for metric in self.metrics if metric in FRECHET_METRICS]
        return [warning for warning in warnings if warning]


def choose_metrics(requested, reference, *, offered, dinov2_given):
    """The metrics to compute and notes on those left out: `requested` (a --metrics list; UserError when the
    ReferenceStatistics cannot serve one), else every `offered` metric that the reference and the weights on this
    machine allow (FD-DINOv2 needs its weights found offline, unless dinov2_given: a file or random weights)."""
    if requested is not None:
        for metric in requested:
            reason = reference.unavailable(metric)
            if reason:
                raise UserError(f"--metrics {metric}: {reason}")
        return requested, []
    metrics, skipped = [], {}
    for metric in offered:
        reason = reference.unavailable(metric)
        if reason is None and metric == "fd_dinov2" and not dinov2_given:
            try:
                dinov2_weights_path(fetch=False)
            except FileNotFoundError as error:
                reason = str(error)
        if reason:
            skipped.setdefault(reason, []).append(TITLES[metric])
        else:
            metrics.append(metric)
    return metrics, [f"{' and '.join(titles)} skipped: {reason}" for reason, titles in skipped.items()]


def compute_metrics(features, reference, metrics, device="cpu"):
    """{result key: number} of `metrics` (--metrics names) for the concatenated features of all samples against a
    ReferenceStatistics (prepared: its statistics and, for precision and recall, its pool features at hand).

    Result keys: inception_score, fid, sfid, precision, recall, fd_dinov2 (those asked for, in that order).
    """
    results, precision_and_recall = {}, None
    for metric in [name for name in METRICS if name in metrics]:
        feature = METRIC_FEATURES[metric]
        if metric == "is":
            results[RESULT_KEYS[metric]] = inception_score(features[feature])
        elif metric in FRECHET_METRICS:
            if feature not in reference.statistics:
                raise UserError(f"{reference.path} has no {feature} statistics for {metric}: prepare the reference "
                                "with an extractor that computes them")
            results[RESULT_KEYS[metric]] = frechet_distance(*fid_statistics(features[feature]),
                                                            *reference.statistics[feature])
        else:
            if reference.pool_features is None:
                raise UserError(f"{reference.path}: {metric} needs the reference images' features; prepare the "
                                "reference from its images (arr_0)")
            if precision_and_recall is None:  # one computation gives both
                with full_float32(torch.device(device).type):
                    precision_and_recall = dict(zip(("precision", "recall"), precision_recall(
                        reference.pool_features, features[feature], device=device)))
            results[RESULT_KEYS[metric]] = precision_and_recall[metric]
    return results
