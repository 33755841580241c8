"""Latent statistics in every form (batch-norm, file, diffusers config), latent geometry, VAE files."""
import pytest
import torch

from helpers import TINY_VAE
from models.autoencoder import latent_shape, vae_models
from utils.errors import UserError
from weights.latent_stats import (
    denormalize_latents,
    diffusers_config_from_stats,
    estimate_latents_stats,
    normalize_latents,
    set_batchnorm_stats,
    stats_from_batchnorm,
    stats_from_diffusers_config,
)
from weights.vae import load_vae


def random_stats(channels, seed=0):
    """Latent statistics in the file format."""
    g = torch.Generator().manual_seed(seed)
    return {"latents_scale": torch.rand(1, channels, 1, 1, generator=g, dtype=torch.float64) + 0.5,
            "latents_bias": torch.randn(1, channels, 1, 1, generator=g, dtype=torch.float64)}


def test_batchnorm_round_trip_and_eval_normalization():
    stats = random_stats(4)
    bn = torch.nn.BatchNorm2d(4, eps=0.0, affine=False).double().eval()
    set_batchnorm_stats(bn, stats)
    torch.testing.assert_close(bn.running_mean, stats["latents_bias"].flatten(), rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, stats["latents_scale"].flatten().pow(-2), rtol=0, atol=0)
    back = stats_from_batchnorm(bn.running_mean, bn.running_var)
    for key in stats:
        assert back[key].shape == (1, 4, 1, 1)
        torch.testing.assert_close(back[key], stats[key], rtol=1e-15, atol=0)
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(bn(z), normalize_latents(z, stats))  # eps 0: the batch-norm is the normalizer
    bn.running_mean.add_(1)
    moved = stats_from_batchnorm(bn.running_mean, bn.running_var)
    assert not torch.equal(back["latents_bias"], moved["latents_bias"])  # a copy, not a view of the buffers


def test_normalize_and_denormalize_are_inverse():
    stats = random_stats(3)
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(normalize_latents(z, stats), (z - stats["latents_bias"]) * stats["latents_scale"])
    torch.testing.assert_close(denormalize_latents(normalize_latents(z, stats), stats), z)


def test_diffusers_config_round_trip():
    stats = {key: value.float() for key, value in random_stats(4).items()}
    config = diffusers_config_from_stats(stats)
    assert config["scaling_factor"] == 1.0 and len(config["latents_mean"]) == len(config["latents_std"]) == 4
    back = stats_from_diffusers_config(config, 4)
    for key in stats:
        torch.testing.assert_close(back[key], stats[key], rtol=1e-6, atol=1e-7)
    # diffusers' own scaling factor enters the scale: (z - mean) * factor / std
    back = stats_from_diffusers_config({**config, "scaling_factor": 0.5}, 4)
    torch.testing.assert_close(back["latents_scale"], 0.5 * stats["latents_scale"], rtol=1e-6, atol=1e-7)
    no_stats = {"scaling_factor": 0.18215, "latents_mean": None, "latents_std": None}  # an SD-VAE config
    assert stats_from_diffusers_config(no_stats, 4) is None


@pytest.mark.parametrize("arch, resolution, shape", [
    ("f8d4", 256, (4, 32, 32)), ("f16d32", 256, (32, 16, 16)), ("f16d32", 512, (32, 32, 32)),
    ("f8d4-tiny", 64, (4, 8, 8)),
])
def test_latent_shape(arch, resolution, shape):
    with torch.device("meta"):
        vae = vae_models[arch]()
    assert latent_shape(vae, resolution) == shape


def test_latent_shape_needs_a_multiple_of_the_factor():
    with torch.device("meta"):
        vae = vae_models["f16d32"]()
    with pytest.raises(ValueError, match="downsampling factor 16 must divide both sides"):
        latent_shape(vae, 200)


def test_estimated_stats_normalize_to_zero_mean_unit_variance():
    torch.manual_seed(0)
    vae = vae_models[TINY_VAE]().eval()
    batches = [torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8) for _ in range(2)]
    torch.manual_seed(1)
    stats = estimate_latents_stats(vae, batches, "cpu")
    assert all(value.dtype == torch.float32 and value.shape == (1, 4, 1, 1) for value in stats.values())
    torch.manual_seed(1)  # the same posterior samples again
    with torch.no_grad():
        z = torch.cat([vae.encode(images.float() / 127.5 - 1).sample() for images in batches])
    normalized = normalize_latents(z, stats)
    torch.testing.assert_close(normalized.mean(dim=(0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(normalized.var(dim=(0, 2, 3), unbiased=False), torch.ones(4), rtol=0, atol=1e-4)


def test_vae_file_with_stats_beside_it(tmp_path):
    torch.manual_seed(0)
    vae = vae_models[TINY_VAE]()
    path = tmp_path / "tiny.pt"
    torch.save(vae.state_dict(), path)
    with pytest.raises(UserError, match="tiny-latents-stats.pt"):
        load_vae(TINY_VAE, path)
    assert load_vae(TINY_VAE, path, require_stats=False)[1] is None
    stats = {key: value.float() for key, value in random_stats(4).items()}
    torch.save(stats, tmp_path / "tiny-latents-stats.pt")
    loaded, loaded_stats = load_vae(TINY_VAE, path)
    assert all(torch.equal(loaded_stats[key], stats[key]) for key in stats)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))


def test_wrong_vae_files_are_named(tmp_path):
    vae = vae_models[TINY_VAE]()
    path = tmp_path / "tiny.pt"
    torch.save({"model": {}, "ema": {}, "vae": vae.state_dict(), "steps": 3}, path)
    with pytest.raises(UserError, match=f"^--vae-ckpt {path}: {path} holds a REPA-E training checkpoint .*not a VAE "
                                        r"state dict: extract it with save_vae_weights\.py$"):
        load_vae(TINY_VAE, path)
    torch.save(vae.state_dict(), path)
    torch.save(torch.ones(1, 4, 1, 1), tmp_path / "tiny-latents-stats.pt")
    with pytest.raises(UserError, match=r"tiny-latents-stats\.pt holds a Tensor, not latent statistics"):
        load_vae(TINY_VAE, path)
    torch.save({"scale": torch.ones(1, 4, 1, 1)}, tmp_path / "tiny-latents-stats.pt")
    with pytest.raises(UserError, match=r"tiny-latents-stats\.pt holds keys scale, not latent statistics"):
        load_vae(TINY_VAE, path)
    with pytest.raises(UserError, match="--vae f9d9 is unknown"):
        load_vae("f9d9", path)
