"""Reference statistics: what evaluate.py scores samples against, and what a training loop checks before it starts.

A reference is an .npz file, either
- an ADM reference batch (openai/guided-diffusion evaluations): `arr_0` uint8 (N, H, W, 3) images and, when
  precomputed, `mu`, `sigma` (Inception pool_3) and `mu_s`, `sigma_s` (spatial), all four or none; or
- what reference_stats.py writes: those four and/or `mu_dinov2`, `sigma_dinov2` (FD-DINOv2), each pair as np.mean
  and np.cov(rowvar=False) give it (mu float32 like the features, sigma float64), no images, and as metadata
  `source` (the images' path), `num_images`, `resolution` and the sha256 of each feature network's weights file
  (`inception_weights_sha256`, `dinov2_weights_sha256`; "random" for random weights).
Statistics a reference lacks are computed from its images (ReferenceStatistics.prepare); precision and recall need
the images.
"""
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evaluation.features import FEATURE_NETWORKS, FRECHET_METRICS, INCEPTION_DIMS, METRIC_FEATURES
from evaluation.metrics import fid_statistics
from evaluation.npz import NpzImages
from utils.errors import UserError
from utils.files import atomic_write

# The (mean, covariance) keys of each feature's statistics; the ADM pairs come all together or not at all.
STATISTICS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"), "dinov2": ("mu_dinov2", "sigma_dinov2")}
ADM_FEATURES = ("pool", "spatial")
SHA256_KEYS = {"inception": "inception_weights_sha256", "dinov2": "dinov2_weights_sha256"}


@dataclass
class ReferenceStatistics:
    """What a reference file holds: {feature: (mu, sigma)}, its images (arr_0) when it has them, the resolution and
    image count, its source and the recorded {network: weights sha256}; pool_features once prepare computed them."""

    path: str
    statistics: dict
    images: NpzImages | None = None
    resolution: int | None = None
    num_images: int | None = None
    source: str | None = None
    weights_sha256: dict = field(default_factory=dict)
    pool_features: np.ndarray | None = None

    @classmethod
    def load(cls, path):
        """Read a reference file (an ADM reference batch or reference_stats.py's); bad files raise UserError."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path} is no .npz file")
        with np.load(path) as npz:
            statistics = _read_statistics(path, npz)
            images = NpzImages(path) if "arr_0" in npz.files else None
            if not statistics and images is None:
                raise UserError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma, ...): pass an ADM "
                                "reference batch or a file reference_stats.py wrote")
            metadata = {key: npz[key].item() for key in ("source", "num_images", "resolution") if key in npz.files}
            weights_sha256 = {network: str(npz[key]) for network, key in SHA256_KEYS.items() if key in npz.files}
        return cls(str(path), statistics, images,
                   resolution=metadata.get("resolution", images.resolution if images is not None else None),
                   num_images=metadata.get("num_images", len(images) if images is not None else None),
                   source=metadata.get("source"), weights_sha256=weights_sha256)

    @classmethod
    def from_features(cls, features, source, resolution, weights_sha256):
        """The statistics of reference images' {feature: (N, D) array} (pool and spatial both or neither)."""
        if ("pool" in features) != ("spatial" in features):
            raise ValueError("the ADM statistics need both the pool and the spatial features")
        statistics = {feature: fid_statistics(features[feature]) for feature in STATISTICS_KEYS if feature in features}
        networks = {FEATURE_NETWORKS[feature] for feature in statistics}
        return cls(None, statistics, resolution=resolution, num_images=len(next(iter(features.values()))),
                   source=str(source), weights_sha256={name: weights_sha256[name] for name in networks})

    def save(self, path):
        """Write the statistics and metadata to an .npz at path, atomically (reference_stats.py's file)."""
        arrays = {}
        for feature, (mu, sigma) in self.statistics.items():
            mu_key, sigma_key = STATISTICS_KEYS[feature]
            arrays[mu_key], arrays[sigma_key] = mu, sigma
        arrays.update(source=np.array(self.source), num_images=np.array(self.num_images),
                      resolution=np.array(self.resolution))
        arrays.update({SHA256_KEYS[name]: np.array(sha) for name, sha in self.weights_sha256.items()})
        with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, **arrays)
        self.path = str(path)
        return Path(path)

    def unavailable(self, metric):
        """Why this reference cannot serve `metric` (a --metrics name), or None when it can."""
        if self.images is not None:
            return None
        if metric in ("precision", "recall"):
            return f"{self.path} holds no images (arr_0), which precision and recall need"
        feature = METRIC_FEATURES[metric]
        if metric in FRECHET_METRICS and feature not in self.statistics:
            return f"{self.path} holds neither {'/'.join(STATISTICS_KEYS[feature])} nor images (arr_0) to compute them"
        return None

    def prepare(self, extractor, batch_size=64, desc=None):
        """Compute from the images what the extractor's metrics need and the file lacks: the statistics it does not
        hold, and the pool features of precision and recall (batches of batch_size images); returns self."""
        reasons = [reason for reason in map(self.unavailable, extractor.metrics) if reason]
        if reasons:
            raise UserError(reasons[0])
        missing = [METRIC_FEATURES[metric] for metric in extractor.metrics
                   if metric in FRECHET_METRICS and METRIC_FEATURES[metric] not in self.statistics]
        pool_wanted = bool({"precision", "recall"} & set(extractor.metrics)) and self.pool_features is None
        wanted = list(dict.fromkeys(missing + (["pool"] if pool_wanted else [])))
        if not wanted:
            return self
        features = extractor.extract(self.images.batches(batch_size), wanted, total=-(-len(self.images) // batch_size),
                                     desc=desc)
        for feature in missing:
            self.statistics[feature] = fid_statistics(features[feature])
        if pool_wanted:
            self.pool_features = features["pool"]
        return self


def _read_statistics(path, npz):
    """{feature: (mu, sigma)} of the statistics an .npz holds; a pair given in part or of odd shape raises UserError."""
    present = [key for keys in STATISTICS_KEYS.values() for key in keys if key in npz.files]
    for group in (ADM_FEATURES, ("dinov2",)):
        keys = [key for feature in group for key in STATISTICS_KEYS[feature]]
        missing = [key for key in keys if key not in present]
        if missing and len(missing) < len(keys):
            raise UserError(f"{path} holds only some precomputed statistics (no {', '.join(missing)}): give all of "
                            f"{', '.join(keys)} or none")
    statistics = {}
    for feature, (mu_key, sigma_key) in STATISTICS_KEYS.items():
        if mu_key not in present:
            continue
        mu, sigma = npz[mu_key], npz[sigma_key]
        dim = INCEPTION_DIMS.get(feature, "D")
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or dim not in ("D", len(mu)):
            raise UserError(f"{path}: {mu_key} is {mu.shape} and {sigma_key} {sigma.shape}; expected ({dim},) and "
                            f"({dim}, {dim})")
        statistics[feature] = (mu, sigma)
    return statistics


def _describe_weights(sha256):
    """'random weights' or 'weights of sha256 0123456789ab...'."""
    return "random weights" if sha256 == "random" else f"weights of sha256 {sha256[:12]}..."


def check_reference(reference, resolution, extractor):
    """Refuse (UserError) a reference of other than resolution-px images, or whose statistics the extractor would use
    were made with other feature-network weights than its own. What a reference does not record (an ADM batch holds
    no weights hashes) is not checked."""
    if reference.resolution is not None and reference.resolution != resolution:
        raise UserError(f"{reference.path} is a reference of {reference.resolution}-px images, not {resolution}-px: "
                        f"make one of {resolution}-px images (reference_stats.py --resolution {resolution})")
    used = {FEATURE_NETWORKS[METRIC_FEATURES[metric]] for metric in extractor.metrics
            if metric in FRECHET_METRICS and METRIC_FEATURES[metric] in reference.statistics}
    for network in sorted(used & set(reference.weights_sha256)):
        recorded, current = reference.weights_sha256[network], extractor.weights_sha256()[network]
        if recorded != current:
            raise UserError(f"{reference.path} was made with {network} {_describe_weights(recorded)}, but "
                            f"{_describe_weights(current)} ({extractor.weights()[network]}) are in use: make it again "
                            f"with reference_stats.py and these weights, or use the weights it was made with")
