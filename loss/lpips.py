"""LPIPS-VGG perceptual distance from the `lpips` package, built without network access."""
import types
import warnings
from pathlib import Path
from unittest import mock

import lpips
import torch
import torch.nn as nn
from torchvision.models import vgg

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, the LPIPS trunk
SCALINGS = ("published", "corrected")


def vgg16_path() -> Path:
    """Where torchvision looks for the VGG16 weights: $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def build_lpips(pretrained_trunk=True) -> lpips.LPIPS:
    """lpips.LPIPS(net='vgg') with its shipped linear heads; trunk from the local hub cache or random."""
    if pretrained_trunk and not vgg16_path().is_file():
        # torchvision would try to download it; fail early with what to do instead.
        raise FileNotFoundError(
            f"LPIPS needs the torchvision VGG16 weights {VGG16_FILE}, not found at {vgg16_path()}: put the file "
            "there (set TORCH_HOME to use another cache), or pass --lpips-random-init (smoke runs)"
        )
    # LPIPS keeps only the VGG's features: a random trunk need not draw the classifier's 124M weights
    torchvision_models = types.SimpleNamespace(vgg16=vgg.vgg16 if pretrained_trunk else random_vgg16)
    with warnings.catch_warnings(), mock.patch.object(lpips.pretrained_networks, "tv", torchvision_models):
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for `pretrained=`
        net = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=not pretrained_trunk, verbose=False)
    return net.eval().requires_grad_(False)


def random_vgg16(pretrained=False):
    """torchvision's randomly initialised VGG16 with its classifier on the meta device (never allocated)."""
    features = vgg.make_layers(vgg.cfgs["D"])
    with torch.device("meta"):
        return vgg.VGG(features)  # initialises the features' convolutions as torchvision does


class PerceptualLoss(nn.Module):
    """Frozen LPIPS distance (B, 1, 1, 1) between image batches in [-1, 1]; always in eval mode.

    scaling="published" maps the [-1, 1] inputs through 2x-1 once more before the VGG (the released
    checkpoints were trained so); "corrected" feeds them as they are.
    """

    def __init__(self, scaling="published", pretrained_trunk=True):
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"lpips scaling must be one of {SCALINGS}, got {scaling!r}")
        self.normalize = scaling == "published"
        self.lpips = build_lpips(pretrained_trunk)

    def train(self, mode=True):
        """Ignore train(): LPIPS is a fixed metric (its heads hold dropout layers)."""
        return super().train(False)

    def forward(self, x, y):
        return self.lpips(x, y, normalize=self.normalize)
