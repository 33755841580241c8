"""VAE regularizer: parity with the published loss (tests/fixtures/vae_loss.pt) and its switches."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fixtures.fill import fill_
from helpers import FIXTURES, load_fixture
from loss.discriminator import NLayerDiscriminator
from loss.lpips import PerceptualLoss, build_lpips
from loss.vae_loss import ReconstructionLoss_Single_Stage
from models.autoencoder import DiagonalGaussianDistribution as Posterior

CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "l1_lpips_kl_gan.yaml"
TOL = dict(rtol=1e-5, atol=1e-6)


def fill_like_fixture(loss_fn):
    """Fixture weights: fill_ the LPIPS net and the discriminator separately, LPIPS heads non-negative."""
    lp = loss_fn.perceptual_loss.lpips
    fill_(lp)
    fill_(loss_fn.discriminator)
    with torch.no_grad():
        for i in range(5):
            getattr(lp, f"lin{i}").model[1].weight.abs_()
    return loss_fn


def build(fx, **overrides):
    """The fixture's loss with a random (then filled) VGG trunk, in training mode."""
    config = OmegaConf.create(fx["config"])
    config.losses.update(overrides)
    return fill_like_fixture(ReconstructionLoss_Single_Stage(config, pretrained_lpips=False)).train()


@pytest.fixture(scope="module")
def fx():
    return load_fixture("vae_loss.pt")


@pytest.fixture(scope="module")
def loss_fn(fx):
    return build(fx)


def assert_terms(terms, expected):
    assert list(terms) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(terms[key].float(), value.float(), **TOL, msg=key)


def test_yaml_is_the_published_config(fx):
    config = OmegaConf.to_container(OmegaConf.load(CONFIG_PATH))
    assert config["losses"].pop("lpips_scaling") == "published"
    assert config == fx["config"]


def test_lpips_matches_published(fx, loss_fn):
    out = loss_fn.perceptual_loss(fx["inputs"], fx["reconstructions"])
    assert out.shape == fx["lpips_raw"].shape
    torch.testing.assert_close(out, fx["lpips_raw"], rtol=1e-5, atol=1e-5)


def test_generator_matches_published(fx, loss_fn):
    posterior = Posterior(fx["posterior_moments"])
    total, terms = loss_fn(fx["inputs"], fx["reconstructions"], posterior, fx["global_step"], "generator")
    torch.testing.assert_close(total, fx["generator_total"], **TOL)
    assert_terms(terms, fx["generator_terms"])


def test_discriminator_matches_published(fx, loss_fn):
    total, terms = loss_fn(fx["inputs"], fx["reconstructions"], None, fx["global_step"], "discriminator")
    torch.testing.assert_close(total, fx["discriminator_total"], **TOL)
    assert_terms(terms, fx["discriminator_terms"])


def test_gradients_reach_the_right_modules(fx, loss_fn):
    recon = fx["reconstructions"].clone().requires_grad_(True)
    loss_fn.zero_grad(set_to_none=True)
    total, _ = loss_fn(fx["inputs"], recon, Posterior(fx["posterior_moments"]), fx["global_step"])
    total.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())  # D, LPIPS and logvar stay untouched

    d_loss, _ = loss_fn(fx["inputs"], recon, None, fx["global_step"], "discriminator")
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    assert all(p.grad is None for p in loss_fn.perceptual_loss.parameters())


def test_discriminator_start_gates_gan_terms(fx, loss_fn, monkeypatch):
    monkeypatch.setattr(loss_fn, "discriminator_start", fx["global_step"] + 1)
    posterior = Posterior(fx["posterior_moments"])
    total, terms = loss_fn(fx["inputs"], fx["reconstructions"], posterior, fx["global_step"])
    assert terms["discriminator_factor"] == 0 and terms["gan_loss"] == 0 and terms["weighted_gan_loss"] == 0
    expected = fx["generator_total"] - fx["generator_terms"]["weighted_gan_loss"]
    torch.testing.assert_close(total, expected, **TOL)
    d_loss, d_terms = loss_fn(fx["inputs"], fx["reconstructions"], None, fx["global_step"], "discriminator")
    assert d_loss == 0
    torch.testing.assert_close(d_terms["logits_real"], fx["discriminator_terms"]["logits_real"], **TOL)


def test_lecam_off_has_no_buffers(loss_fn):
    assert not hasattr(loss_fn, "ema_real_logits_mean")


def test_lecam_on(fx):
    weight, decay = 0.5, 0.9
    loss_fn = build(fx, lecam_regularization_weight=weight, lecam_ema_decay=decay)
    assert torch.equal(loss_fn.ema_real_logits_mean, torch.zeros(1))
    d_loss, terms = loss_fn(fx["inputs"], fx["reconstructions"], None, fx["global_step"], "discriminator")
    real, fake = fx["discriminator_terms"]["logits_real"], fx["discriminator_terms"]["logits_fake"]
    # EMAs start at zero: lecam = relu(real - 0)^2 + relu(0 - fake)^2
    expected = weight * (real.clamp(min=0) ** 2 + (-fake).clamp(min=0) ** 2)
    torch.testing.assert_close(terms["lecam_loss"], expected, **TOL)
    torch.testing.assert_close(d_loss, fx["discriminator_total"] + expected, **TOL)
    torch.testing.assert_close(loss_fn.ema_real_logits_mean, (1 - decay) * real.reshape(1), **TOL)
    torch.testing.assert_close(loss_fn.ema_fake_logits_mean, (1 - decay) * fake.reshape(1), **TOL)


@pytest.mark.slow
def test_corrected_lpips_scaling_differs(fx, loss_fn):
    corrected = PerceptualLoss("corrected", pretrained_trunk=False)
    corrected.lpips.load_state_dict(loss_fn.perceptual_loss.lpips.state_dict())
    x, y = fx["inputs"], fx["reconstructions"]
    out = corrected(x, y)
    torch.testing.assert_close(out, loss_fn.perceptual_loss.lpips(x, y, normalize=False))
    assert (out - fx["lpips_raw"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="lpips scaling"):
        PerceptualLoss("[-1,1]", pretrained_trunk=False)


def test_perceptual_net_stays_in_eval(loss_fn):
    loss_fn.train()
    assert loss_fn.discriminator.training
    assert not any(m.training for m in loss_fn.perceptual_loss.modules())


def test_missing_vgg_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        build_lpips(pretrained_trunk=True)
    path = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert str(err.value) == (f"LPIPS needs the torchvision VGG16 weights vgg16-397923af.pth, not found at {path}: "
                              "put the file there (set TORCH_HOME to use another cache), or pass --lpips-random-init "
                              "(smoke runs)")


def test_discriminator_layout():
    layout = json.loads((FIXTURES / "state_dicts" / "discriminator.json").read_text())
    state = NLayerDiscriminator().state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in layout.items()}


def test_discriminator_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    assert abs(disc.main[8].weight.std().item() - 0.02) < 1e-3
    assert abs(disc.main[9].weight.mean().item() - 1.0) < 5e-3 and disc.main[9].bias.abs().max() == 0
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_bad_config(fx):
    losses = fx["config"]["losses"]
    with pytest.raises(ValueError, match="quantize_mode"):
        ReconstructionLoss_Single_Stage({"model": {"vq_model": {"quantize_mode": "vq"}}, "losses": losses})
    with pytest.raises(ValueError, match="reconstruction_loss"):
        ReconstructionLoss_Single_Stage({"losses": {**losses, "reconstruction_loss": "l3"}}, pretrained_lpips=False)


@pytest.mark.slow
def test_discriminator_warmup_trains_the_discriminator_first(fx, monkeypatch):
    loss_fn = build(fx, discriminator_warmup=True)
    monkeypatch.setattr(loss_fn, "discriminator_start", fx["global_step"] + 1)
    posterior = Posterior(fx["posterior_moments"])
    # before discriminator_start: no adversarial term in the VAE loss, but the discriminator's own loss is on
    total, terms = loss_fn(fx["inputs"], fx["reconstructions"], posterior, fx["global_step"])
    assert terms["discriminator_factor"] == 0 and terms["weighted_gan_loss"] == 0
    torch.testing.assert_close(total, fx["generator_total"] - fx["generator_terms"]["weighted_gan_loss"], **TOL)
    d_loss, _ = loss_fn(fx["inputs"], fx["reconstructions"], None, fx["global_step"], "discriminator")
    torch.testing.assert_close(d_loss, fx["discriminator_total"], **TOL)
    # from discriminator_start on: the published terms
    total, terms = loss_fn(fx["inputs"], fx["reconstructions"], posterior, fx["global_step"] + 1)
    torch.testing.assert_close(total, fx["generator_total"], **TOL)


def test_scratch_disc_config_differs_from_the_published_only_in_the_start():
    published = OmegaConf.to_container(OmegaConf.load(CONFIG_PATH))["losses"]
    scratch = OmegaConf.to_container(OmegaConf.load(CONFIG_PATH.with_name("l1_lpips_kl_gan_scratch_disc.yaml")))
    assert scratch["losses"].pop("discriminator_warmup") is True and scratch["losses"].pop("discriminator_start") > 0
    published.pop("discriminator_start")
    assert scratch["losses"] == published


@pytest.mark.parametrize("test_config, config", [
    ("tiny_vae_loss.yaml", "l1_lpips_kl_gan.yaml"),
    ("tiny_vae_loss_scratch_disc.yaml", "l1_lpips_kl_gan_scratch_disc.yaml")])
def test_the_test_runs_configs_differ_from_theirs_only_in_the_discriminator_width(test_config, config):
    tiny = OmegaConf.to_container(OmegaConf.load(FIXTURES / test_config))
    assert tiny["losses"].pop("discriminator_channels") == 8
    assert tiny == OmegaConf.to_container(OmegaConf.load(CONFIG_PATH.with_name(config)))
    loss_fn = ReconstructionLoss_Single_Stage(OmegaConf.load(FIXTURES / test_config), pretrained_lpips=False)
    assert loss_fn.discriminator.main[0].out_channels == 8


def test_a_random_lpips_trunk_is_vgg16s_features_at_torchvision_initialisation():
    import torchvision

    torch.manual_seed(0)
    trunk = build_lpips(pretrained_trunk=False).net
    ours = [layer for part in (trunk.slice1, trunk.slice2, trunk.slice3, trunk.slice4, trunk.slice5) for layer in part]
    with torch.device("meta"):
        theirs = list(torchvision.models.vgg16().features)[:len(ours)]
    assert [repr(layer) for layer in ours] == [repr(layer) for layer in theirs]
    for conv in (layer for layer in ours if isinstance(layer, torch.nn.Conv2d)):
        assert conv.weight.device.type == "cpu" and torch.equal(conv.bias, torch.zeros_like(conv.bias))
        expected_std = (2 / (conv.out_channels * 9)) ** 0.5  # kaiming normal, fan out, as torchvision's VGG
        assert abs(conv.weight.std().item() / expected_std - 1) < 0.1

