"""The ADM evaluator's metrics in PyTorch/numpy: Inception features, FID, sFID, Inception Score, precision/recall.

Every definition follows openai/guided-diffusion `evaluations/evaluator.py` (the numbers the diffusion papers
report, REPA-E included):
- features of the FID Inception network (the TF 2015 graph `classify_image_graph_def.pb`), fed uint8 NHWC images
  of any size (the graph resizes them to 299x299 itself);
- FID: Frechet distance of (mean, np.cov) of the 2048-d `pool_3` features, with the evaluator's fallback that adds
  eps to the covariance diagonals when the matrix square root of their product is not finite;
- sFID: the same on the spatial features `mixed_6/conv[..., :7]` (17x17x7 = 2023 values per image, flattened in
  NHWC order as TensorFlow lays them out, so precomputed `mu_s`/`sigma_s` of the reference batches fit);
- Inception Score: softmax of pool_3 times the logits weight matrix (no bias), exp of the mean KL in splits of 5000;
- precision/recall: the k=3 manifold estimator on pool_3, squared distances computed in float16 per 10000x10000
  block, in float32 for a block where float16 overflows, as the evaluator's DistanceBlock.

The network is torch-fidelity's port (`FeatureExtractorInceptionV3`), which reproduces the graph's own bilinear
resize and its TF-specific pooling. Which of its layers is the sFID tensor: torch-fidelity converted the TF weights
by name (utils/util_convert_inception_weights.py), mapping `mixed_6/conv/{conv2d_params,batchnorm}` to
`Mixed_6d.branch1x1.{conv,bn}` (mixed, mixed_1..mixed_10 are Mixed_5b..5d, 6a..6e, 7a..7c). In the graph the op
named `mixed_6/conv` comes after `mixed_6/conv/Conv2D` and `mixed_6/conv/batchnorm`: it is the layer's ReLU. So
`mixed_6/conv:0` is the output of `Mixed_6d.branch1x1` (conv, batch norm, ReLU), 192 x 17 x 17, of which the
evaluator keeps the first 7 channels; a forward hook takes it there.
"""
import io
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from utils.errors import UserError

INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
INCEPTION_ENV = "REPAE_INCEPTION_WEIGHTS"
SPATIAL_CHANNELS = 7  # the evaluator's spatial[..., :7]
DISTANCE_BATCH_SIZE = 10000  # the evaluator's ManifoldEstimator row and column batch sizes


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between Gaussians (mu1, sigma1) and (mu2, sigma2), as the ADM evaluator computes it."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics do not match: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # numerical error might give a slight imaginary component
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_statistics(features):
    """(mean, covariance) of (N, D) features: np.mean and np.cov(rowvar=False), as the evaluator."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def inception_score(softmax_probs, split_size=5000):
    """Inception Score of (N, classes) class probabilities: mean over splits of exp(mean KL(p(y|x) || p(y)))."""
    scores = []
    for start in range(0, len(softmax_probs), split_size):
        part = softmax_probs[start:start + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def pairwise_distances(u, v):
    """Squared distances (float32) between rows of u and v, computed in float16 unless that overflows.

    The evaluator's DistanceBlock: float16 inputs and results (products summed in float32, as TensorFlow's GPU
    kernels do), the float32 computation instead for a block with a non-finite float16 value.
    """
    u16, v16 = u.half(), v.half()
    norm_u = (u16 * u16).float().sum(1).half()
    norm_v = (v16 * v16).float().sum(1).half()
    products = (u16.float() @ v16.float().T).half()
    distances = torch.clamp_min(norm_u[:, None] - 2 * products + norm_v[None, :], 0)
    if torch.isfinite(distances).all():
        return distances.float()
    u, v = u.float(), v.float()
    return torch.clamp_min((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :], 0)


def _as_tensor(features, device):
    """float32 torch view of a numpy feature array on device."""
    return torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)


def manifold_radii(features, k=3, batch_size=DISTANCE_BATCH_SIZE, device="cpu"):
    """(N,) float32 squared distance of each feature to its k-th nearest neighbour, itself counting as the 0-th."""
    features = _as_tensor(features, device)
    if len(features) <= k:
        raise UserError(f"precision and recall need more than k={k} images per batch, got {len(features)}: "
                        "score more images")
    radii = np.zeros(len(features), dtype=np.float32)
    for start in range(0, len(features), batch_size):
        rows = features[start:start + batch_size]
        nearest = []  # the k+1 smallest of each column block hold the k+1 smallest of the whole row
        for col in range(0, len(features), batch_size):
            distances = pairwise_distances(rows, features[col:col + batch_size])
            nearest.append(distances.topk(min(k + 1, distances.shape[1]), dim=1, largest=False).values)
        radii[start:start + len(rows)] = torch.cat(nearest, 1).kthvalue(k + 1, dim=1).values.cpu().numpy()
    return radii


def precision_recall(ref_features, sample_features, k=3, batch_size=DISTANCE_BATCH_SIZE, device="cpu"):
    """(precision, recall): the fraction of samples inside the reference manifold and of references in the samples'.

    A point is inside a manifold when its squared distance to one of the manifold's points is at most that point's
    k-NN radius (manifold_radii), as the evaluator's ManifoldEstimator.evaluate_pr.
    """
    ref_radii = torch.from_numpy(manifold_radii(ref_features, k, batch_size, device)).to(device)
    sample_radii = torch.from_numpy(manifold_radii(sample_features, k, batch_size, device)).to(device)
    ref, samples = _as_tensor(ref_features, device), _as_tensor(sample_features, device)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_inside = torch.zeros(len(samples), dtype=torch.bool, device=device)
    for row in range(0, len(ref), batch_size):
        for col in range(0, len(samples), batch_size):
            distances = pairwise_distances(ref[row:row + batch_size], samples[col:col + batch_size])
            rows, cols = slice(row, row + len(distances)), slice(col, col + distances.shape[1])
            ref_inside[rows] |= (distances <= sample_radii[None, cols]).any(1)
            sample_inside[cols] |= (distances <= ref_radii[rows, None]).any(0)
    return float(sample_inside.double().mean()), float(ref_inside.double().mean())


def inception_weights_path(path=None):
    """The Inception weights: `path`, else $REPAE_INCEPTION_WEIGHTS, else torch-fidelity's torch hub cache file."""
    cache_file = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    path = path or os.environ.get(INCEPTION_ENV) or cache_file
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"Inception weights {INCEPTION_FILE} not found at {path}: download {INCEPTION_URL} into "
            f"{cache_file.parent} (set TORCH_HOME for another cache), or point --inception-weights or "
            f"{INCEPTION_ENV} at the file")
    return Path(path)


class InceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's FID Inception giving pool_3, the sFID tensor mixed_6/conv[..., :7] and class probabilities.

    weights_path None keeps random weights (smoke runs); nothing is ever downloaded.
    """

    def __init__(self, weights_path=None):
        # torch-fidelity loads (or downloads) its weights while it is built; hand it an empty file instead.
        empty = io.BytesIO()
        torch.save(None, empty)
        empty.seek(0)
        super().__init__("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=empty)
        self.weights_path = weights_path
        if weights_path is None:
            self._unit_scale_init()
        else:
            try:
                self.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
            except Exception as error:
                raise UserError(f"{weights_path} is no {INCEPTION_FILE}: {str(error).splitlines()[0]}") from None
        self._spatial = None
        self.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """nn.Module.load_state_dict, except that the empty file (None) leaves the weights as they are."""
        return None if state_dict is None else super().load_state_dict(state_dict, *args, **kwargs)

    def _unit_scale_init(self):
        """Random weights that keep activations at unit scale, so smoke-run features still vary with the input."""
        for module in self.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def _keep_spatial(self, module, inputs, output):
        """Forward hook on Mixed_6d.branch1x1: keep mixed_6/conv[..., :7], flattened in NHWC order."""
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)

    @torch.no_grad()
    def activations(self, images):
        """uint8 (B, H, W, 3) images -> float32 numpy pool (B, 2048), spatial (B, 2023) and softmax (B, 1008)."""
        images = torch.as_tensor(images, device=next(self.parameters()).device)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        pool, logits = self(images.permute(0, 3, 1, 2))
        probs = torch.softmax(logits, dim=1)
        return tuple(x.float().cpu().numpy() for x in (pool, self._spatial, probs))


def load_vaes(arch, ckpts, image_size, seed=0):
    """{ckpt: VAE in eval mode} of every checkpoint, loaded up front so that a bad one fails before any work.

    Errors name the --vae-ckpt in one line; 'none' gives a random VAE seeded with `seed`.
    """
    from models.autoencoder import vae_names
    from utils.latents import load_vae

    if arch not in vae_names:
        raise UserError(f"--vae {arch} is unknown; known: {', '.join(vae_names)}")
    vaes = {}
    for ckpt in ckpts:
        torch.manual_seed(seed)
        try:
            vae, _ = load_vae(arch, ckpt, require_stats=False)
        except (UserError, OSError) as error:  # missing, unreadable or another layout
            raise UserError(f"--vae-ckpt {ckpt}: {' '.join(str(error).split())}") from None
        if any(side % vae.downsample_factor for side in image_size):
            raise UserError(f"images of {image_size[0]}x{image_size[1]} pixels do not fit --vae {arch}: its "
                             f"downsampling factor {vae.downsample_factor} must divide both sides")
        vaes[ckpt] = vae.eval()
    return vaes


def build_inception(weights=None, random_init=False, device="cpu"):
    """The Inception network on device: from `weights` (or where inception_weights_path looks) or random."""
    if random_init:
        warnings.warn("random Inception weights: the numbers are only a smoke test, not FID/IS/precision/recall")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random network in every run
            return InceptionV3().to(device)
    return InceptionV3(inception_weights_path(weights)).to(device)


class NpzImages:
    """The uint8 (N, H, W, 3) image array of an .npz, read a batch at a time.

    Memory-mapped when the array is stored uncompressed (np.savez, as generate.py and the ADM reference batches);
    streamed through zlib when compressed (np.savez_compressed). Errors name the file.
    """

    def __init__(self, path, key="arr_0"):
        self.path, self.key = Path(path), key
        if not self.path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = [name.removesuffix(".npy") for name in archive.namelist()]
                if key not in names:
                    raise UserError(f"{path} has no '{key}' array (it holds {', '.join(names) or 'nothing'}): "
                                     "expected an .npz with uint8 images under arr_0, as generate.py writes")
                info = archive.getinfo(f"{key}.npy")
                with archive.open(info) as member:
                    self.shape, dtype = self._read_header(member)
                    header_size = member.tell()
        except zipfile.BadZipFile:
            raise UserError(f"{path} is no .npz file") from None
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise UserError(f"{path}: '{key}' is {dtype} {self.shape}; expected uint8 images (N, H, W, 3)")
        self.memmap = None
        if info.compress_type == zipfile.ZIP_STORED:
            self.memmap = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape,
                                    offset=self._data_offset(info) + header_size)

    def _read_header(self, member):
        """(shape, dtype) from the header of the .npy stream `member`, leaving it at the data."""
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise UserError(f"{self.path}: unsupported .npy format version {version} for '{self.key}'")
        shape, fortran_order, dtype = read_header[version](member)
        if fortran_order:
            raise UserError(f"{self.path}: '{self.key}' is Fortran-ordered; save it with np.savez from a C array")
        return shape, dtype

    def _data_offset(self, info):
        """Byte offset of a stored member's data: after its 30-byte local header, file name and extra field."""
        with open(self.path, "rb") as f:
            f.seek(info.header_offset + 26)
            name_length, extra_length = np.frombuffer(f.read(4), dtype="<u2")
        return info.header_offset + 30 + int(name_length) + int(extra_length)

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size):
        """Yield uint8 (b, H, W, 3) arrays of at most batch_size images, in order."""
        if self.memmap is not None:
            for start in range(0, len(self), batch_size):
                yield np.array(self.memmap[start:start + batch_size])
            return
        image_bytes = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as member:
            self._read_header(member)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = np.frombuffer(member.read(count * image_bytes), dtype=np.uint8)
                yield data.reshape(count, *self.shape[1:]).copy()
