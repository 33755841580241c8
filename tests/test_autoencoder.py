"""AutoencoderKL: published state-dict layouts, parity with the published VAE, posterior behaviour."""
import json

import pytest
import torch

from fixtures.fill import fill_
from helpers import FIXTURES, load_fixture
from models.autoencoder import AutoencoderKL, DiagonalGaussianDistribution, vae_arch_of, vae_models

ARCHS = ["f8d4", "f16d32"]


def build_filled(arch):
    """Full-size float64 model with the fixture weights (built on meta to skip the random init)."""
    with torch.device("meta"):
        vae = vae_models[arch]()
    vae = vae.to_empty(device="cpu").double().eval()
    return fill_(vae)


def tiny_vae():
    """Two-level float64 model with attention at its lowest level."""
    torch.manual_seed(0)
    vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 2), ch=32, num_res_blocks=1, attn_resolutions=(8,), resolution=16)
    return vae.double()


@pytest.fixture(scope="module", params=["f8d4", pytest.param("f16d32", marks=pytest.mark.slow)])
def filled(request):
    """(arch, filled model, fixture) built once per module and arch."""
    arch = request.param
    return arch, build_filled(arch), load_fixture(f"vae_{arch}.pt")


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_layout_matches_published(arch):
    with torch.device("meta"):
        vae = vae_models[arch]()
    ref = json.loads((FIXTURES / "state_dicts" / f"vae-{arch}.json").read_text())
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert list(ours) == list(ref)
    assert ours == {k: v["shape"] for k, v in ref.items()}


@pytest.mark.parametrize("arch, channels, factor", [("f8d4", 4, 8), ("f16d32", 32, 16), ("f8d4-pico", 4, 8)])
def test_latent_shape_attributes(arch, channels, factor):
    with torch.device("meta"):
        vae = vae_models[arch]()
    assert (vae.latent_channels, vae.downsample_factor) == (channels, factor)


def test_parity_with_published(filled):
    arch, vae, ref = filled
    assert ref["arch"] == arch
    with torch.no_grad():
        posterior = vae.encode(ref["image"])
        decoded = vae.decode(posterior.mean)
    got = {"mean": posterior.mean, "logvar": posterior.logvar, "std": posterior.std, "kl": posterior.kl(),
           "decoded_mean": decoded}
    for name, value in got.items():
        assert value.shape == ref[name].shape, name
        torch.testing.assert_close(value, ref[name], rtol=1e-9, atol=1e-9 * ref[name].abs().max().item(), msg=name)


def test_forward_returns_posterior_sample_and_reconstruction():
    vae = tiny_vae().eval()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        posterior, z, recon = vae(x, sample_posterior=False)
        assert z.shape == (2, 4, 8, 8) and recon.shape == x.shape
        torch.testing.assert_close(z, posterior.mean, rtol=0, atol=0)
        torch.testing.assert_close(recon, vae.decode(posterior.mean), rtol=0, atol=0)
        torch.manual_seed(1)
        _, z_sampled, _ = vae(x)
        torch.manual_seed(1)
        expected = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
    torch.testing.assert_close(z_sampled, expected, rtol=0, atol=0)


def test_posterior_clamps_logvar_and_kl_formula():
    mean = torch.tensor([[[[0.5]], [[-1.0]]]], dtype=torch.float64)
    logvar = torch.tensor([[[[-100.0]], [[100.0]]]], dtype=torch.float64)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert posterior.logvar.flatten().tolist() == [-30.0, 20.0]
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))
    torch.testing.assert_close(posterior.var, torch.exp(posterior.logvar))
    lv = torch.tensor([-30.0, 20.0], dtype=torch.float64)
    expected = 0.5 * (torch.tensor([0.25, 1.0], dtype=torch.float64) + lv.exp() - 1 - lv).sum()
    torch.testing.assert_close(posterior.kl(), expected.reshape(1))
    assert torch.equal(posterior.mode(), mean)


def test_arch_of_state_dict():
    for arch, build in vae_models.items():
        with torch.device("meta"):
            assert vae_arch_of(build().state_dict()) == arch
    assert vae_arch_of(tiny_vae().state_dict()) is None
    assert vae_arch_of({}) is None


def test_grad_checkpointing_off_by_default_and_same_gradients():
    vae = tiny_vae().train()
    assert not any(getattr(m, "grad_checkpointing", False) for m in vae.modules())
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    grads = []
    for enabled in (True, False):
        vae.set_grad_checkpointing(enabled)
        assert all(m.grad_checkpointing == enabled for m in vae.modules() if hasattr(m, "grad_checkpointing"))
        vae.zero_grad()
        posterior, _, recon = vae(x, sample_posterior=False)
        (recon.square().mean() + posterior.kl().mean()).backward()
        grads.append([p.grad.clone() for p in vae.parameters()])
    for with_ckpt, without in zip(*grads):
        torch.testing.assert_close(with_ckpt, without, rtol=1e-12, atol=1e-14)
