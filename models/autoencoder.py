"""KL-regularized convolutional autoencoder (LDM layout) used as the REPA-E VAE.

Module names and shapes are those of the released VAE checkpoints: f8d4 is the SD-VAE
layout, f16d32 the IN-VAE / VA-VAE layout.
"""
import json

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils.errors import UserError


def Normalize(channels):
    """GroupNorm with the LDM settings (32 groups, eps 1e-6)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block; a 1x1 conv matches channels on the skip path."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.grad_checkpointing = False

    def _forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h

    def forward(self, x):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head attending over all positions.
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom only (the LDM asymmetric pad)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks, attns):
    """One resolution level as a module with the checkpoints' child names (block, attn, down/upsample)."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels):
    """Middle stage: residual block, attention, residual block."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_level(level, h):
    """Apply a level's residual blocks, each followed by its attention block if the level has them."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _run_mid(mid, h):
    """Apply the middle stage."""
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image (B,3,H,W) -> moments (B, 2*z_channels, H/f, W/f)."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_levels, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        channels = ch
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(channels, ch * mult))
                channels = ch * mult
                if i in attn_levels:
                    attns.append(AttnBlock(channels))
            level = _level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(channels)
            self.down.append(level)
        self.mid = _mid(channels)
        self.norm_out = Normalize(channels)
        self.conv_out = nn.Conv2d(channels, 2 * z_channels, kernel_size=3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h*f, w*f)."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_levels, z_channels):
        super().__init__()
        top = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top, kernel_size=3, padding=1)
        self.mid = _mid(top)
        # up[i] is level i (same resolution as encoder level i); it is run from the lowest resolution up.
        self.up = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            channels = ch * ch_mult[min(i + 1, len(ch_mult) - 1)]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, ch * mult))
                channels = ch * mult
                if i in attn_levels:
                    attns.append(AttnBlock(channels))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(channels)
            self.up.append(level)
        self.norm_out = Normalize(ch * ch_mult[0])
        self.conv_out = nn.Conv2d(ch * ch_mult[0], 3, kernel_size=3, padding=1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """Diagonal Gaussian posterior from moments (B, 2C, h, w): mean and log-variance halves."""

    def __init__(self, moments):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self):
        """Reparameterized draw mean + std * eps."""
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self):
        """The posterior mean."""
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) per sample, summed over latent channels and positions."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """Encoder -> quant_conv -> Gaussian posterior; z -> post_quant_conv -> Decoder.

    Attention blocks sit at the levels whose resolution (for a `resolution`-pixel input) is in
    `attn_resolutions`, as in the LDM configs; the middle stage always has attention.
    """

    def __init__(self, embed_dim, ch_mult, ch=128, num_res_blocks=2, attn_resolutions=(16,), resolution=256):
        super().__init__()
        attn_levels = tuple(i for i in range(len(ch_mult)) if resolution // 2 ** i in attn_resolutions)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, attn_levels, embed_dim)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, attn_levels, embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)
        self.ch, self.ch_mult, self.num_res_blocks, self.attn_levels = ch, tuple(ch_mult), num_res_blocks, attn_levels
        self.latent_channels = embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)

    def set_grad_checkpointing(self, enabled=True):
        """Turn activation checkpointing of the residual blocks on or off (off by default)."""
        for module in self.modules():
            if isinstance(module, ResnetBlock):
                module.grad_checkpointing = enabled

    def encode(self, x):
        """Images in [-1, 1] -> posterior distribution over latents."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """Latents -> images (roughly in [-1, 1])."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True):
        """Returns (posterior, z, reconstruction); z is a posterior sample or its mean."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return posterior, z, self.decode(z)


def VAE_F8D4(**kwargs):
    """SD-VAE layout: 8x downsampling, 4 latent channels."""
    return AutoencoderKL(embed_dim=4, ch_mult=(1, 2, 4, 4), **kwargs)


def VAE_F16D32(**kwargs):
    """IN-VAE / VA-VAE layout: 16x downsampling, 32 latent channels, attention at the 16px level."""
    return AutoencoderKL(embed_dim=32, ch_mult=(1, 1, 2, 2, 4), **kwargs)


def VAE_F8D4_Tiny(**kwargs):
    """f8d4 latents from a narrow network (about 1M parameters): smoke runs, tests and the demo only."""
    return AutoencoderKL(embed_dim=4, ch_mult=(1, 1, 2, 2), ch=32, num_res_blocks=1, attn_resolutions=(), **kwargs)


def VAE_F16D32_Tiny(**kwargs):
    """f16d32 latents from a narrow network: smoke runs, tests and the demo only."""
    return AutoencoderKL(embed_dim=32, ch_mult=(1, 1, 2, 2, 2), ch=32, num_res_blocks=1, attn_resolutions=(),
                         **kwargs)


def VAE_F8D4_Pico(**kwargs):
    """f8d4 latents from a network 32 channels wide at every level (0.37M parameters): the test suite's runs."""
    return AutoencoderKL(embed_dim=4, ch_mult=(1, 1, 1, 1), ch=32, num_res_blocks=1, attn_resolutions=(), **kwargs)


vae_models = {"f8d4": VAE_F8D4, "f16d32": VAE_F16D32, "f8d4-tiny": VAE_F8D4_Tiny, "f16d32-tiny": VAE_F16D32_Tiny,
              "f8d4-pico": VAE_F8D4_Pico}


def vae_arch_of(state_dict):
    """Registry name of the layout whose keys and shapes state_dict has exactly, or None (built on meta: free)."""
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    for arch, build in vae_models.items():
        with torch.device("meta"):
            reference = build()
        if shapes == {key: tuple(value.shape) for key, value in reference.state_dict().items()}:
            return arch
    return None


# --vae value of a diffusers AutoencoderKL of any block layout: its folder's config decides the network.
DIFFUSERS_VAE = "diffusers"
vae_names = (*vae_models, DIFFUSERS_VAE)


class DiffusersAutoencoder(nn.Module):
    """A diffusers AutoencoderKL behind the contract of AutoencoderKL above (encode -> posterior, decode -> tensor,
    forward -> (posterior, z, recon), latent_channels, downsample_factor, set_grad_checkpointing).

    Its submodules are registered under diffusers' own names, so its state-dict keys are exactly diffusers' and a
    checkpoint's `vae` entry loads into diffusers.AutoencoderKL(**config) as it is.
    """

    SUBMODULES = ("encoder", "decoder", "quant_conv", "post_quant_conv")  # quant convs may be None (FLUX, SD3)

    def __init__(self, model):
        super().__init__()
        for name in self.SUBMODULES:
            self.add_module(name, getattr(model, name))
        if self.state_dict().keys() != model.state_dict().keys():
            raise ValueError(f"{type(model).__name__} has submodules besides {', '.join(self.SUBMODULES)}")
        # Not a child (its tensors would be registered twice); kept for its own gradient-checkpointing switch.
        self.__dict__["diffusers_model"] = model
        # A plain JSON-like dict (lists, not tuples): it is stored in training checkpoints as `vae_config`.
        self.config = json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))
        self.latent_channels = self.config["latent_channels"]
        self.downsample_factor = self.downsample_factor_of(self.config)

    @staticmethod
    def downsample_factor_of(config):
        """Every down block but the last halves the resolution."""
        return 2 ** (len(config["block_out_channels"]) - 1)

    def set_grad_checkpointing(self, enabled=True):
        """Turn diffusers' activation checkpointing of the encoder and decoder blocks on or off."""
        if enabled:
            self.diffusers_model.enable_gradient_checkpointing()
        else:
            self.diffusers_model.disable_gradient_checkpointing()

    def encode(self, x):
        """Images in [-1, 1] -> posterior distribution over latents (diffusers' AutoencoderKL._encode, untiled)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z):
        """Latents -> images (roughly in [-1, 1]) (diffusers' AutoencoderKL._decode, untiled)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x, sample_posterior=True):
        """Returns (posterior, z, reconstruction); z is a posterior sample or its mean."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return posterior, z, self.decode(z)


def preprocess_imgs_vae(images):
    """uint8 images -> floats in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def check_image_size(image_size, factor, vae_name="the VAE"):
    """UserError unless the downsampling factor divides both sides of (H, W) images."""
    height, width = image_size
    if height % factor or width % factor:
        raise UserError(f"images of {height}x{width} pixels do not fit {vae_name}: its downsampling factor {factor} "
                        "must divide both sides; check --resolution and --vae")


def latent_shape(vae, resolution):
    """(channels, size, size) of the latents of resolution-pixel square images through `vae`."""
    check_image_size((resolution, resolution), vae.downsample_factor)
    return vae.latent_channels, resolution // vae.downsample_factor, resolution // vae.downsample_factor


def to_uint8(images):
    """Decoded images in [-1, 1] -> uint8 in the same layout and place, truncating like the reference samples."""
    return torch.clamp(255.0 * (images + 1) / 2, 0, 255).to(torch.uint8)


def to_uint8_hwc(images):
    """Decoded images in [-1, 1] (N, 3, H, W) -> a uint8 (N, H, W, 3) numpy array, as image files and .npz hold."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
