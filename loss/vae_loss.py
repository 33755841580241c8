"""VAE regularizer of REPA-E: L1/L2 + LPIPS + KL + PatchGAN (hinge, optional LeCam).

Configured from configs/l1_lpips_kl_gan.yaml (keys under `losses`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from loss.discriminator import NLayerDiscriminator
from loss.lpips import PerceptualLoss


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: mean(relu(1 - real)) and mean(relu(1 + fake)), averaged."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def lecam_loss(real_mean, fake_mean, ema_real_mean, ema_fake_mean):
    """LeCam regularizer: keeps each logit mean from drifting past the other side's EMA."""
    return F.relu(real_mean - ema_fake_mean).pow(2).mean() + F.relu(ema_real_mean - fake_mean).pow(2).mean()


class ReconstructionLoss_Single_Stage(nn.Module):
    """The REPA-E VAE loss; owns the discriminator. Inputs and reconstructions are in [-1, 1]."""

    def __init__(self, config, pretrained_lpips=True):
        super().__init__()
        config = OmegaConf.create(config)  # accepts a plain dict too
        mode = OmegaConf.select(config, "model.vq_model.quantize_mode", default="vae")
        if mode != "vae":
            raise ValueError(f"only model.vq_model.quantize_mode 'vae' is supported, got {mode!r}")
        cfg = config.losses
        if cfg.get("perceptual_loss", "lpips") != "lpips":
            raise ValueError(f"only perceptual_loss 'lpips' is supported, got {cfg.perceptual_loss!r}")
        if cfg.reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {cfg.reconstruction_loss!r}")

        # Parameters in the order logvar, discriminator, LPIPS net, so that an optimizer over self.parameters()
        # loads the `opt_disc` state dicts of REPA-E checkpoints.
        # discriminator_channels: the first layer's width (published: 64; narrower for CPU test runs).
        self.discriminator = NLayerDiscriminator(input_nc=3, ndf=int(cfg.get("discriminator_channels", 64)),
                                                 n_layers=3)
        self.perceptual_loss = PerceptualLoss(cfg.get("lpips_scaling", "published"), pretrained_lpips)
        self.logvar = nn.Parameter(torch.full((), float(cfg.get("logvar_init", 0.0))), requires_grad=False)

        self.reconstruction_loss = cfg.reconstruction_loss
        self.reconstruction_weight = cfg.reconstruction_weight
        self.perceptual_weight = cfg.perceptual_weight
        self.kl_weight = cfg.get("kl_weight", 1e-6)
        self.discriminator_start = cfg.discriminator_start
        # published (false): the discriminator's loss and the adversarial term both wait for discriminator_start;
        # true: the discriminator trains from step 0 and only the adversarial term waits, so that a discriminator
        # trained from scratch has learnt for discriminator_start steps before its gradient reaches the VAE.
        self.discriminator_warmup = bool(cfg.get("discriminator_warmup", False))
        self.discriminator_factor = float(cfg.discriminator_factor)
        self.discriminator_weight = float(cfg.discriminator_weight)
        self.lecam_weight = cfg.get("lecam_regularization_weight", 0.0)
        self.lecam_ema_decay = cfg.get("lecam_ema_decay", 0.999)
        if self.lecam_weight > 0.0:
            self.register_buffer("ema_real_logits_mean", torch.zeros(1))
            self.register_buffer("ema_fake_logits_mean", torch.zeros(1))

    def should_discriminator_be_trained(self, global_step):
        """The discriminator's loss is on from discriminator_start (from step 0 with discriminator_warmup)."""
        return self.discriminator_warmup or self.adversarial_term_on(global_step)

    def adversarial_term_on(self, global_step):
        """The generator's adversarial term switches on at discriminator_start."""
        return global_step >= self.discriminator_start

    def forward(self, inputs, reconstructions, posteriors, global_step, mode="generator"):
        """mode "generator" -> (VAE loss, weighted terms); "discriminator" -> (D loss, logit stats)."""
        if mode not in ("generator", "discriminator"):
            raise ValueError(f"mode must be 'generator' or 'discriminator', got {mode!r}")
        # The losses run in float32 even under mixed precision.
        with torch.autocast(inputs.device.type, enabled=False):
            inputs, reconstructions = inputs.float().contiguous(), reconstructions.float().contiguous()
            if mode == "generator":
                return self._generator(inputs, reconstructions, posteriors, global_step)
            return self._discriminator(inputs, reconstructions, global_step)

    def _generator(self, inputs, reconstructions, posteriors, global_step):
        """Reconstruction + perceptual + KL + adversarial loss of the autoencoder."""
        distance = F.l1_loss if self.reconstruction_loss == "l1" else F.mse_loss
        rec_loss = distance(inputs, reconstructions) * self.reconstruction_weight / torch.exp(self.logvar)
        perceptual_loss = self.perceptual_loss(inputs, reconstructions).mean()
        kl = posteriors.kl().float()
        kl_loss = kl.sum() / kl.shape[0]  # summed over the latent, averaged over the batch

        factor = self.discriminator_factor if self.adversarial_term_on(global_step) else 0.0
        gan_loss = torch.zeros((), device=inputs.device)
        if factor > 0.0 and self.discriminator_weight > 0.0:
            # Gradients reach the reconstructions through D but must not accumulate in D.
            self.discriminator.requires_grad_(False)
            gan_loss = -self.discriminator(reconstructions).mean()
        weighted_gan_loss = self.discriminator_weight * factor * gan_loss

        total = (rec_loss + self.perceptual_weight * perceptual_loss + self.kl_weight * kl_loss
                 + weighted_gan_loss)
        terms = dict(
            total_loss=total.detach().clone(),
            reconstruction_loss=rec_loss.detach(),
            perceptual_loss=(self.perceptual_weight * perceptual_loss).detach(),
            kl_loss=(self.kl_weight * kl_loss).detach(),
            weighted_gan_loss=weighted_gan_loss.detach(),
            discriminator_factor=torch.tensor(factor, device=inputs.device),
            d_weight=torch.tensor(self.discriminator_weight, device=inputs.device),
            gan_loss=gan_loss.detach(),
        )
        return total, terms

    def _discriminator(self, inputs, reconstructions, global_step):
        """Hinge loss of D on real inputs vs detached reconstructions, plus optional LeCam."""
        factor = self.discriminator_factor if self.should_discriminator_be_trained(global_step) else 0.0
        self.discriminator.requires_grad_(True)
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        loss = factor * hinge_d_loss(logits_real, logits_fake)

        lecam = torch.zeros((), device=inputs.device)
        if self.lecam_weight > 0.0:
            real_mean, fake_mean = logits_real.mean(), logits_fake.mean()
            lecam = self.lecam_weight * lecam_loss(
                real_mean, fake_mean, self.ema_real_logits_mean, self.ema_fake_logits_mean)
            with torch.no_grad():  # the EMAs move after the loss is computed from them
                decay = self.lecam_ema_decay
                self.ema_real_logits_mean.mul_(decay).add_((1.0 - decay) * real_mean)
                self.ema_fake_logits_mean.mul_(decay).add_((1.0 - decay) * fake_mean)
        loss = loss + lecam

        terms = dict(
            discriminator_loss=loss.detach(),
            logits_real=logits_real.detach().mean(),
            logits_fake=logits_fake.detach().mean(),
            lecam_loss=lecam.detach(),
        )
        return loss, terms

