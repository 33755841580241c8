"""FD-DINOv2 as NVlabs/edm2 computes it: edm2's preprocessing, the hub model's class token and position embedding,
the weights lookup and its one-line refusals. A small ViT (dinov2-vit-s) stands in for ViT-L/14."""
import math

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import evaluate
from evaluation import dinov2
from evaluation.dinov2 import build_dinov2, dinov2_input, dinov2_weights_path
from evaluation.features import FeatureExtractor, choose_metrics, compute_metrics
from evaluation.flags import METRICS
from evaluation.reference import ReferenceStatistics
from helpers import randomize_vit_
from utils.errors import report_user_errors

SMALL = "dinov2-vit-s"
# edm2's DINOv2Detector: the ImageNet mean and std, written out here as edm2 writes them
EDM2_MEAN, EDM2_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(autouse=True)
def small_dinov2(monkeypatch):
    """A ViT-S/14 instead of the ViT-L/14, which is too slow for tests on a CPU."""
    monkeypatch.setattr(dinov2, "DINOV2_ENCODER", SMALL)


@pytest.fixture
def no_dinov2_weights(tmp_path, monkeypatch):
    """Empty torch.hub and Hugging Face caches, no weights variables: no DINOv2 weights on this machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for name in ("dinov2-vit-s", "dinov2-vit-l"):
        monkeypatch.delenv("REPAE_ENCODER_CKPT_" + name.upper().replace("-", "_"), raising=False)
    return tmp_path


def random_images(count, size=32, seed=0):
    """uint8 (count, size, size, 3) images."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def edm2_input(images):
    """edm2's DINOv2Detector preprocessing (resize_mode 'torch') of uint8 NHWC images, written out."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # edm2 is fed NCHW uint8
    x = F.interpolate(x.to(torch.float32), size=(224, 224), mode="bicubic", antialias=True)
    x = x.to(torch.float32) / 255
    x = x - torch.tensor(EDM2_MEAN).reshape(1, -1, 1, 1)
    return x / torch.tensor(EDM2_STD).reshape(1, -1, 1, 1)


def hub_pos_encoding(pos_embed, size, patch_size=14):
    """DINOv2's interpolate_pos_encoding (facebookresearch/dinov2 vision_transformer.py) for a size x size input."""
    npatch_side = size // patch_size
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    sx = sy = float(npatch_side + 0.1) / m
    patch_pos_embed = F.interpolate(pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2),
                                    mode="bicubic", antialias=False, scale_factor=(sx, sy))
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, pos_embed.shape[-1])
    return torch.cat((pos_embed[:, :1].float(), patch_pos_embed), dim=1)


def hub_class_token(model, x):
    """The hub model's output: its tokens with the interpolated position embedding, its blocks, the final norm, the
    class token (x_norm_clstoken; the head is an identity)."""
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # DINOv2's PatchEmbed takes any size
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1)
    tokens = tokens + hub_pos_encoding(model.pos_embed, x.shape[-1])
    for block in model.blocks:
        tokens = block(tokens)
    return model.norm(tokens)[:, 0]


def official_checkpoint(path):
    """An official-layout DINOv2 ViT-S/14 file (518-px model: 37x37 positions, mask token) with random weights whose
    layer scales and positions matter; returns the 518-px timm model it holds."""
    model = randomize_vit_(timm.create_model("vit_small_patch14_dinov2", img_size=518, num_classes=0).eval())
    state = {**model.state_dict(), "mask_token": torch.zeros(1, 384)}
    torch.save(state, path)
    return model


def test_input_is_edm2_preprocessing():
    images = random_images(2, size=256)
    x = dinov2_input(torch.from_numpy(images))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x, edm2_input(images), rtol=0, atol=0)
    # edm2 resizes with antialiasing: a 256 -> 224 resize without it differs
    plain = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(224, 224), mode="bicubic")
    plain = (plain / 255 - torch.tensor(EDM2_MEAN).reshape(1, -1, 1, 1)) / torch.tensor(EDM2_STD).reshape(1, -1, 1, 1)
    assert (x - plain).abs().max() > 0.05


@pytest.mark.slow
def test_features_are_the_final_norm_class_token():
    net = build_dinov2(random_init=True)
    images = random_images(3, size=40, seed=1)
    features = net.features(torch.from_numpy(images))
    # a plain timm forward of the same weights on edm2's input: the class token of the final norm's output
    model = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0).eval()
    model.load_state_dict(net.encoder.state_dict())
    with torch.no_grad():
        x = edm2_input(images)
        final_norm = model.forward_features(x)
        tokens = model.pos_drop(model._pos_embed(model.patch_embed(x)))
        expected = model.norm(model.blocks(tokens))[:, 0]
    assert features.shape == (3, 384) and features.dtype == np.float32
    np.testing.assert_allclose(features, final_norm[:, 0].numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert features.std(0).mean() > 0.01  # random weights with unit layer scales: features vary with the image


@pytest.mark.slow
def test_official_weights_give_the_hub_models_features(tmp_path):
    source = official_checkpoint(tmp_path / "dinov2_vits14_pretrain.pth")
    net = build_dinov2(weights=str(tmp_path / "dinov2_vits14_pretrain.pth"))
    # the 37x37 positions interpolated once, as the hub model interpolates them at every 224-px forward
    with torch.no_grad():
        expected_pos = hub_pos_encoding(source.pos_embed, 224)
    torch.testing.assert_close(net.encoder.pos_embed, expected_pos, rtol=0, atol=0)
    assert not torch.allclose(resample_abs_pos_embed(source.pos_embed, [16, 16]), expected_pos, atol=1e-3)  # timm's
    images = random_images(2, size=64, seed=2)
    with torch.no_grad():
        expected = hub_class_token(source, edm2_input(images))
    np.testing.assert_allclose(net.features(torch.from_numpy(images)), expected.numpy(), rtol=1e-4, atol=1e-4)
    assert net.weights_path == tmp_path / "dinov2_vits14_pretrain.pth"


def test_weights_found_as_the_training_encoders_are(no_dinov2_weights, monkeypatch):
    hub_dir = no_dinov2_weights / "torch" / "hub" / "checkpoints"
    with pytest.raises(FileNotFoundError) as error:
        dinov2_weights_path()
    message = str(error.value)
    for fragment in ("dinov2_vits14_pretrain.pth", "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/",
                     str(hub_dir), "--dinov2-weights", "REPAE_ENCODER_CKPT_DINOV2_VIT_S", "--dinov2-random-init"):
        assert fragment in message
    assert "\n" not in message
    hub_dir.mkdir(parents=True)
    official_checkpoint(hub_dir / "dinov2_vits14_pretrain.pth")
    assert dinov2_weights_path() == hub_dir / "dinov2_vits14_pretrain.pth"
    monkeypatch.setenv("REPAE_ENCODER_CKPT_DINOV2_VIT_S", str(no_dinov2_weights / "elsewhere.pth"))
    with pytest.raises(FileNotFoundError, match="elsewhere.pth does not exist"):
        dinov2_weights_path()


def test_missing_weights_end_with_one_line(no_dinov2_weights, monkeypatch):
    monkeypatch.setattr(dinov2, "DINOV2_ENCODER", "dinov2-vit-l")  # the real network's file names, nothing built
    np.savez(no_dinov2_weights / "ref.npz", arr_0=random_images(4))
    argv = [str(no_dinov2_weights / "ref.npz"), str(no_dinov2_weights / "ref.npz"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(evaluate.main)(argv + ["--metrics", "fd_dinov2"])
    message = str(exit_info.value)
    assert message.startswith("error: DINOv2 weights dinov2_vitl14_pretrain.pth (FD-DINOv2) not found: download "
                              "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth into "
                              f"{no_dinov2_weights / 'torch' / 'hub' / 'checkpoints'}")
    assert "REPAE_ENCODER_CKPT_DINOV2_VIT_L" in message and "\n" not in message
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(evaluate.main)(argv + ["--metrics", "fd_dinov2", "--dinov2-weights",
                                                  str(no_dinov2_weights / "nothere.pth")])
    assert "nothere.pth does not exist" in str(exit_info.value) and "\n" not in str(exit_info.value)


def test_default_metrics_skip_fd_dinov2_without_weights_with_one_note(no_dinov2_weights):
    np.savez(no_dinov2_weights / "ref.npz", arr_0=random_images(4))
    reference = ReferenceStatistics.load(no_dinov2_weights / "ref.npz")
    metrics, notes = choose_metrics(None, reference, offered=list(METRICS), dinov2_given=False)
    assert metrics == ["is", "fid", "sfid", "precision", "recall"]
    assert len(notes) == 1 and notes[0].startswith("FD-DINOv2 skipped: DINOv2 weights dinov2_vits14_pretrain.pth")
    assert choose_metrics(None, reference, offered=list(METRICS), dinov2_given=True) == (list(METRICS), [])

def test_fd_dinov2_of_identical_sets_is_zero_and_of_shifted_sets_the_squared_shift():
    extractor = FeatureExtractor(["fd_dinov2"], dinov2_random_init=True)
    assert list(extractor.networks) == ["dinov2"] and extractor.features == ["dinov2"]  # no Inception built
    # 40 features of 16 values: full-rank covariances, so the square roots take milliseconds
    features = {"dinov2": np.random.default_rng(3).standard_normal((40, 16)).astype(np.float32)}
    reference = ReferenceStatistics.from_features(features, "ref", 32, extractor.weights_sha256())
    assert reference.weights_sha256 == {"dinov2": "random"} and reference.num_images == 40
    assert abs(compute_metrics(features, reference, ["fd_dinov2"])["fd_dinov2"]) < 1e-9
    shifted = {"dinov2": features["dinov2"] + np.float32(0.5)}  # same covariance, mean moved by 0.5 per value
    assert compute_metrics(shifted, reference, ["fd_dinov2"])["fd_dinov2"] == pytest.approx(16 * 0.25, rel=1e-5)
