"""Samplers: parity with the published ODE/SDE samplers on the tiny SiT (sit_tiny.pt), and guidance logic."""
import pytest
import torch

from helpers import assert_close_rel, fixture_sit
from models.interpolant import interpolant
from models.sit import SiT_models
from sampling.samplers import euler_maruyama_sampler, euler_sampler, score_from_velocity


@pytest.fixture(scope="module")
def model(sit_fix):
    return fixture_sit(sit_fix).eval()


# Residuals are about 1e-9 relative: the timestep features are computed in float32.
@pytest.mark.parametrize("case", ["ode_euler_cfg1", "ode_euler_cfg3_interval", "ode_heun_cfg2"])
def test_ode_samplers_match_published(model, sit_fix, case):
    out = euler_sampler(model, sit_fix["sampler_latents"], sit_fix["sampler_y"], **sit_fix["sampler_cases"][case])
    assert_close_rel(out, sit_fix[f"sampler_{case}"])


@pytest.mark.parametrize("case", ["sde_cfg1", "sde_cfg2_interval"])
def test_sde_samplers_match_published(model, sit_fix, case):
    torch.manual_seed(0)  # the fixture drew one randn_like(state) per noisy step after this seed
    cfg = sit_fix["sampler_cases"][case]
    out = euler_maruyama_sampler(model, sit_fix["sampler_latents"], sit_fix["sampler_y"], **cfg)
    assert_close_rel(out, sit_fix[f"sampler_{case}"])


class CountingModel(torch.nn.Module):
    """Velocity = 0 for real labels, 1 for the null label; records each call's times and labels."""

    num_classes = 7

    def __init__(self):
        super().__init__()
        self.calls = []

    def inference(self, x, t, y):
        self.calls.append((t[0].item(), y.tolist()))
        return (y == self.num_classes).to(x.dtype).view(-1, 1, 1, 1).expand_as(x).clone()


def test_guidance_interval_and_null_label():
    model = CountingModel()
    latents = torch.zeros(2, 1, 2, 2, dtype=torch.float32)
    out = euler_sampler(model, latents, torch.tensor([0, 1]), num_steps=4, cfg_scale=3.0,
                        guidance_low=0.3, guidance_high=0.8)
    # t = 1, 0.75, 0.5, 0.25: guidance (doubled batch, null label 7) only at 0.75 and 0.5
    assert [len(y) for _, y in model.calls] == [2, 4, 4, 2]
    assert model.calls[1][1] == [0, 1, 7, 7]
    # guided velocity = 1 + 3 * (0 - 1) = -2 on the guided steps, 0 otherwise; x moves by -dt * v
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.full_like(out, 0.25 * -2 * -2))


def test_no_guidance_at_scale_one_and_heun_skips_last_correction():
    model = CountingModel()
    euler_sampler(model, torch.zeros(1, 1, 2, 2), torch.tensor([3]), num_steps=3, heun=True)
    assert [t for t, _ in model.calls] == pytest.approx([1.0, 2 / 3, 2 / 3, 1 / 3, 1 / 3])
    assert all(y == [3] for _, y in model.calls)


def test_sde_times_and_noise_draws():
    model = CountingModel()
    latents = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    torch.manual_seed(0)
    euler_maruyama_sampler(model, latents, torch.tensor([3]), num_steps=5)
    assert [t for t, _ in model.calls] == pytest.approx([1.0, 0.76, 0.52, 0.28, 0.04])
    # one randn_like(state) per noisy step, none on the last step
    after = torch.randn(1)
    torch.manual_seed(0)
    for _ in range(4):
        torch.randn_like(latents)
    assert torch.equal(torch.randn(1), after)


def test_sde_single_step_is_deterministic():
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outs.append(euler_maruyama_sampler(CountingModel(), torch.ones(1, 1, 2, 2), torch.tensor([3]), num_steps=1))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_score_from_velocity_on_gaussian_data(path_type):
    """For data x ~ N(0, I) the score of x_t is -x_t / (alpha^2 + sigma^2); check against the exact velocity."""
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    x_t = torch.randn(2, 3, dtype=torch.float64)
    a, s, da, ds = (v.view(-1, 1) for v in interpolant(t, path_type))
    var = a ** 2 + s ** 2
    v = (a * da + s * ds) / var * x_t  # E[da x + ds eps | x_t] for Gaussian data
    torch.testing.assert_close(score_from_velocity(v, x_t, t, path_type), -x_t / var)


def reference_velocity(model, x, y, t, cfg_scale, use_cfg, sde=False, path_type="linear"):
    """The network call of a plain per-step sampler: the batch built per step, times as float64 tensors."""
    if use_cfg:
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.num_classes)])
    t_in = torch.full((x.shape[0],), float(t), dtype=torch.float64)
    v = model.inference(x.float(), t_in.float(), y=y).double()
    if sde:
        v = v - 0.5 * (2 * t) * score_from_velocity(v, x, t_in, path_type)
    cond, uncond = v.chunk(2) if use_cfg else (v, v)
    return uncond + cfg_scale * (cond - uncond) if use_cfg else v


def reference_sampler(model, x, y, num_steps, sde, cfg_scale, guidance_low, guidance_high, path_type="linear"):
    """Euler ODE or Euler-Maruyama SDE as a plain per-step loop (tensor times, per-step guidance decisions)."""
    if sde:
        t_steps = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1).double()])
    else:
        t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = x.double()
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        use_cfg = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        noisy = sde and i < len(t_steps) - 2
        deps = torch.randn_like(x) * torch.sqrt(torch.abs(t_next - t_cur)) if noisy else 0
        d_cur = reference_velocity(model, x, y, t_cur, cfg_scale, use_cfg, sde, path_type)
        x = x + d_cur * (t_next - t_cur) + (torch.sqrt(2 * t_cur) * deps if noisy else 0)
    return x


NO_GUIDANCE = dict(cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0)
GUIDANCE_INTERVAL = dict(cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7)


# The fast tier runs two of the eight cases: the ODE without guidance, the SDE with a guidance interval.
@pytest.mark.parametrize("sde,cfg,path_type", [
    pytest.param(sde, cfg, path_type, marks=() if (sde, cfg is GUIDANCE_INTERVAL) in ((False, False), (True, True))
                 and path_type == "linear" else pytest.mark.slow)
    for sde in (False, True) for cfg in (NO_GUIDANCE, GUIDANCE_INTERVAL) for path_type in ("linear", "cosine")])
def test_samples_identical_to_the_per_step_implementation(sde, cfg, path_type):
    torch.manual_seed(0)
    model = SiT_models["SiT-T/2"](input_size=8, num_classes=10, z_dims=[8], encoder_depth=1).eval()
    for param in model.parameters():  # nonzero output layers: the samples depend on the network
        param.data.normal_(0, 0.05)
    latents, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    sampler = euler_maruyama_sampler if sde else euler_sampler
    torch.manual_seed(1)
    out = sampler(model, latents, y, num_steps=50, path_type=path_type, **cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = reference_sampler(model, latents, y, 50, sde, path_type=path_type, **cfg)
    assert torch.equal(out, expected)
