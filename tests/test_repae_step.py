"""The REPA-E and latent-diffusion steps called in this process on the trainers' own tiny networks: stop-gradient,
the REPA coefficients, the three updates and the EMA, host reads, the non-finite skip, fp16 scaling; and the
checkpoint round trip of a run's bookkeeping."""
import argparse
import copy

import pytest
import torch
from accelerate.state import AcceleratorState

import train_ldm_only
import train_repae
from dataset.h5 import ImageDataset
from helpers import ROOT, assert_same_state, first_state, make_dataset, tiny_repae_flags, tiny_sit
from training.ema import make_ema
from training.guard import NonFiniteGuard
from training.nets import FrozenEncoders, SiTNets
from training.run import TrainingRun
from training.setup import load_loss_config, make_accelerator
from training.step import make_adamw
from utils.host_reads import count_host_reads
from weights.checkpoint import load_file
from weights.encoders import load_encoders

PUBLISHED = dict(proj_coeff=0.5, vae_align_proj_coeff=1.5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A 16-image, 2-class dataset at 32 px."""
    return make_dataset(tmp_path_factory.mktemp("step_data"))


def build_in_process(data_dir, out, mixed_precision="no", scaler=None):
    """The trainer's own networks built in this process: (accelerator, nets, one batch of images and labels)."""
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    args = train_repae.parse_args(tiny_repae_flags(data_dir, out, "x", **{"--mixed-precision": mixed_precision}))
    accelerator = make_accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=1,
                                   report_to="none", logging_dir=out)
    if scaler is not None:
        accelerator.scaler = scaler
    torch.manual_seed(0)
    loss_config = load_loss_config(ROOT / args.loss_cfg_path, "--loss-cfg-path")
    nets, loader, _ = train_repae.build(args, accelerator, ImageDataset(data_dir), loss_config)
    images, labels = next(iter(loader))
    return accelerator, nets, images, labels


def one_step(nets, images, labels, accelerator, guard, **overrides):
    """One REPA-E step with the published coefficients and a fixed random stream; returns its metrics."""
    torch.manual_seed(1)
    kwargs = dict(loss_kwargs=dict(path_type="linear"), max_grad_norm=1.0, ema_decay=0.9999, **PUBLISHED)
    logs = train_repae.repae_step(nets, images, labels, 0, accelerator, guard, **{**kwargs, **overrides})
    guard.end_step()  # as the training loop closes each step
    return logs


@pytest.fixture(scope="module")
def step_setup(data_dir, tmp_path_factory):
    """The trainer's own networks, built in this process, with one batch and a restorable initial state."""
    accelerator, nets, images, labels = build_in_process(data_dir, tmp_path_factory.mktemp("inproc"))
    with torch.no_grad():  # a non-zero output layer, so the denoising loss has a gradient with respect to z
        nets.sit.final_layer.linear.weight.normal_(std=0.1)
    modules = (nets.sit, nets.ema, nets.vae, nets.vae_loss_fn, nets.opt_sit, nets.opt_vae, nets.opt_disc)
    initial = [copy.deepcopy(module.state_dict()) for module in modules]
    return accelerator, nets, images, labels, modules, initial


def restore(step_setup):
    """Put every network and optimizer back in its initial state; returns (accelerator, nets, images, labels)."""
    accelerator, nets, images, labels, modules, initial = step_setup
    for module, state in zip(modules, initial):
        module.load_state_dict(state)
    return accelerator, nets, images, labels


def vae_gradients(step_setup, diffusion_loss_to_vae, final_layer_scale=1.0):
    """Every gradient the VAE's first convolution receives during one REPA-E step from the initial state."""
    accelerator, nets, images, labels = restore(step_setup)
    with torch.no_grad():
        nets.sit.final_layer.linear.weight.mul_(final_layer_scale)
    received = []
    handle = nets.vae.encoder.conv_in.weight.register_post_accumulate_grad_hook(
        lambda param: received.append(param.grad.clone()))
    one_step(nets, images, labels, accelerator, NonFiniteGuard(10), diffusion_loss_to_vae=diffusion_loss_to_vae)
    handle.remove()
    return received


def test_the_diffusion_loss_reaches_the_vae_only_without_stop_gradient(step_setup):
    # With stop-gradient the VAE gets one gradient (its own update), untouched by the SiT's output layer, which
    # only the diffusion loss uses; without it, that gradient depends on the output layer.
    stopped, stopped_rescaled = vae_gradients(step_setup, False), vae_gradients(step_setup, False, 3.0)
    assert len(stopped) == 1 and torch.equal(stopped[0], stopped_rescaled[0])
    through, through_rescaled = vae_gradients(step_setup, True), vae_gradients(step_setup, True, 3.0)
    assert len(through) == 1 and not torch.allclose(through[0], through_rescaled[0])
    assert not torch.allclose(stopped[0], through[0])


def test_each_loss_takes_its_own_repa_coefficient(step_setup):
    accelerator, nets, images, labels = restore(step_setup)
    logs = one_step(nets, images, labels, accelerator, NonFiniteGuard(10))
    # The SiT's loss weighs its projection loss with proj_coeff, the VAE's with vae_align_proj_coeff.
    torch.testing.assert_close(logs["sit_loss"], logs["denoising_loss"] + 0.5 * logs["proj_loss"])
    regularizer = logs["vae_loss"] - 1.5 * logs["vae_align_loss"]
    without_align = one_step(*restore(step_setup)[1:], accelerator, NonFiniteGuard(10), vae_align_proj_coeff=0.0)
    torch.testing.assert_close(without_align["vae_loss"], regularizer)


def test_one_step_updates_the_sit_the_vae_the_discriminator_and_the_ema(step_setup):
    accelerator, nets, images, labels = restore(step_setup)
    before = {name: copy.deepcopy(module.state_dict()) for name, module in
              [("sit", nets.sit), ("ema", nets.ema), ("vae", nets.vae),
               ("discriminator", nets.vae_loss_fn.discriminator)]}
    one_step(nets, images, labels, accelerator, NonFiniteGuard(10), ema_decay=0.75)
    for name, module in [("sit", nets.sit), ("vae", nets.vae), ("discriminator", nets.vae_loss_fn.discriminator)]:
        key = next(key for key, param in module.named_parameters() if param.requires_grad)
        assert not torch.equal(before[name][key], module.state_dict()[key]), name
    assert all(first_state(opt.state_dict())["step"] == 1 for opt in (nets.opt_sit, nets.opt_vae, nets.opt_disc))
    # The EMA moved a quarter of the way from its start (the SiT before the step) to the updated SiT, in a weight
    # the step changed (adaLN-Zero leaves the blocks' own weights still in a first step).
    after = nets.sit.state_dict()
    key = next(key for key, param in nets.sit.named_parameters() if not torch.equal(before["sit"][key], after[key]))
    assert not torch.equal(nets.ema.state_dict()[key], before["ema"][key])
    torch.testing.assert_close(nets.ema.state_dict()[key], 0.75 * before["ema"][key] + 0.25 * after[key])


def test_a_step_that_does_not_log_reads_nothing_on_the_host(step_setup):
    accelerator, nets, images, labels = restore(step_setup)
    with count_host_reads() as reads:
        one_step(nets, images, labels, accelerator, NonFiniteGuard(10))
    assert reads["reads"] == 0


def test_a_nonfinite_update_is_skipped_whole_without_a_host_read(step_setup):
    accelerator, nets, images, labels = restore(step_setup)
    one_step(nets, images, labels, accelerator, NonFiniteGuard(10))  # gives every optimizer a state
    sit_before = {name: param.detach().clone() for name, param in nets.sit.named_parameters()}
    opt_before = copy.deepcopy(nets.opt_sit.state_dict())
    vae_before = nets.vae.encoder.conv_in.weight.detach().clone()
    guard = NonFiniteGuard(10)
    with count_host_reads() as reads:
        one_step(nets, images, labels, accelerator, guard, proj_coeff=float("inf"))
    assert reads["reads"] == 0
    assert all(torch.equal(sit_before[name], param) for name, param in nets.sit.named_parameters())
    assert_same_state(opt_before, nets.opt_sit.state_dict(), "opt")  # moments and step count untouched
    assert not torch.equal(vae_before, nets.vae.encoder.conv_in.weight)  # the VAE update went through
    assert guard.skipped == 1


def test_fp16_on_cpu_scales_unscales_before_clipping_and_skips_nonfinite_updates(step_setup, data_dir, tmp_path):
    logs32 = one_step(*restore(step_setup)[1:], step_setup[0], NonFiniteGuard(10))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    accelerator, nets, images, labels = build_in_process(data_dir, tmp_path, "fp16", scaler)
    fp16_modules = (nets.sit, nets.ema, nets.vae, nets.vae_loss_fn, nets.opt_sit, nets.opt_vae, nets.opt_disc)
    for module, state in zip(fp16_modules, step_setup[5]):  # the float32 step's start
        module.load_state_dict(state)
    guard = NonFiniteGuard(10)
    logs = one_step(nets, images, labels, accelerator, guard)
    # Three finite updates, each followed by the scaler's growth (interval 1): 2^10 -> 2^13.
    assert scaler.get_scale() == 2.0 ** 13 and guard.skipped == 0
    # Gradients are unscaled before clipping: the norms are those of float32, not 2^10 times larger.
    for name in ("grad_norm_sit", "grad_norm_vae", "grad_norm_disc"):
        torch.testing.assert_close(logs[name].float(), logs32[name].float(), rtol=0.05, atol=1e-3)

    sit_before = {name: param.detach().clone() for name, param in nets.sit.named_parameters()}
    vae_before = nets.vae.encoder.conv_in.weight.detach().clone()
    one_step(nets, images, labels, accelerator, guard, proj_coeff=float("inf"))  # an infinite SiT loss
    # The SiT update is skipped and the scale backs off once; the VAE and discriminator updates went through.
    assert scaler.get_scale() == 2.0 ** 13 * 2 * 2 / 2 and guard.skipped == 1
    assert all(torch.equal(sit_before[name], param) for name, param in nets.sit.named_parameters())
    assert not torch.equal(vae_before, nets.vae.encoder.conv_in.weight)


def test_the_latent_diffusion_step_trains_the_sit_on_posterior_samples_and_moves_its_ema(tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = make_accelerator(mixed_precision="no", gradient_accumulation_steps=1, report_to="none",
                                   logging_dir=tmp_path)
    torch.manual_seed(0)
    encoders = FrozenEncoders(*load_encoders("dinov2-vit-s", "cpu", 32, random_init=True)[:2])
    sit = tiny_sit(in_channels=4, num_classes=2, z_dims=[384])
    ema = make_ema(sit)
    sit.bn.running_var.fill_(4.0)
    optimizer = make_adamw(sit.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    nets = SiTNets(encoders, sit, ema, optimizer)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    moments = torch.randn(2, 8, 4, 4)
    labels = torch.tensor([0, 1])
    before = copy.deepcopy(sit.state_dict())
    torch.manual_seed(1)
    logs = train_ldm_only.ldm_step(nets, images, moments, labels, accelerator, NonFiniteGuard(10),
                                   loss_kwargs=dict(path_type="linear"), proj_coeff=0.5, max_grad_norm=1.0,
                                   ema_decay=0.5)
    torch.testing.assert_close(logs["sit_loss"], logs["denoising_loss"] + 0.5 * logs["proj_loss"])
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(before[key], sit.state_dict()[key])
    torch.testing.assert_close(ema.state_dict()[key], 0.5 * before[key] + 0.5 * sit.state_dict()[key])
    # The normalizer keeps the VAE's statistics: the batch-norm stays in eval mode.
    assert torch.equal(sit.state_dict()["bn.running_var"], torch.full((4,), 4.0))


def test_a_checkpoint_holds_what_a_resume_restores(tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = make_accelerator(mixed_precision="no", gradient_accumulation_steps=1, report_to="none",
                                   logging_dir=tmp_path)

    def run_of(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = make_adamw(model.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
        run = TrainingRun(accelerator, tmp_path / "exp", config=argparse.Namespace(exp_name="exp"), local_batch_size=2,
                          max_train_steps=4, max_nonfinite_steps=3, modules={"model": model},
                          optimizers={"opt": opt})
        return run, model, opt

    run, model, opt = run_of(0)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    run.step, run.epoch, run.batch_in_epoch = 1, 0, 1
    run.open(project="test")
    path = run.save_checkpoint()
    saved = load_file(path)
    assert first_state(saved["opt"])["step"] == 1 and saved["steps"] == 1
    resumed, resumed_model, resumed_opt = run_of(1)
    resumed.resume(path, batches_per_epoch=8, seed=0, gradient_accumulation_steps=1)
    assert_same_state(resumed_model.state_dict(), model.state_dict(), "model")
    assert_same_state(resumed_opt.state_dict(), opt.state_dict(), "opt")
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (1, 0, 1)

