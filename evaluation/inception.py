"""The FID Inception network (the TF 2015 graph `classify_image_graph_def.pb` of the ADM evaluator) and where its
weights are found. It is fed uint8 NHWC images of any size (the graph resizes them to 299x299 itself).

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
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from utils.errors import UserError

INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
INCEPTION_ENV = "REPAE_INCEPTION_WEIGHTS"
SPATIAL_CHANNELS = 7  # the evaluator's spatial[..., :7]


def inception_weights_path(path=None, other_ways_out=()):
    """The Inception weights: `path`, else $REPAE_INCEPTION_WEIGHTS, else torch-fidelity's torch hub cache file.

    other_ways_out: flags of the calling script that also get past missing weights, offered before
    --inception-random-init, e.g. ("--no-rfid (no rFID)",).
    """
    cache_file = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    path = path or os.environ.get(INCEPTION_ENV) or cache_file
    if not Path(path).is_file():
        ways_out = " or ".join([*other_ways_out, "--inception-random-init (smoke runs)"])
        raise FileNotFoundError(
            f"Inception weights {INCEPTION_FILE} not found at {path}: download {INCEPTION_URL} into "
            f"{cache_file.parent} (set TORCH_HOME for another cache), or point --inception-weights or "
            f"{INCEPTION_ENV} at the file, or pass {ways_out}")
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


def build_inception(weights=None, random_init=False, device="cpu", other_ways_out=()):
    """The Inception network on device: from `weights` (or where inception_weights_path looks) or random.

    other_ways_out: see inception_weights_path.
    """
    if random_init:
        warnings.warn("random Inception weights: the numbers are only a smoke test, not FID/IS/precision/recall")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random network in every run
            return InceptionV3().to(device)
    return InceptionV3(inception_weights_path(weights, other_ways_out)).to(device)
