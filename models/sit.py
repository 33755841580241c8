"""SiT (Scalable Interpolant Transformer) with the REPA-E training forward.

DiT/SiT adaLN-Zero blocks, one projector MLP per representation encoder, an affine-free batch-norm that
normalizes the raw VAE latents; module names and shapes are those of the REPA-E checkpoints.
References: facebookresearch/DiT, willisma/SiT, sihyun-yu/REPA, End2End-Diffusion/REPA-E.
"""
import functools
import math

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
from torch.utils.checkpoint import checkpoint

from loss.repa import repa_loss
from models.interpolant import interpolant, mean_flat, sample_time


def modulate(x, shift, scale):
    """adaLN modulation of tokens (N, T, D) by per-sample shift and scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def build_mlp(hidden_size, projector_dim, z_dim):
    """Projector from SiT tokens to one encoder's feature space."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def sincos_1d(dim, pos):
    """Sin-cos embedding (M, dim) of positions pos (M,): sines then cosines."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim, grid_size):
    """Fixed 2-D position embedding (grid_size**2, dim), tokens row-major; as MAE/DiT: column code first."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, col.flatten()), sincos_1d(dim // 2, row.flatten())], dim=1)


class TimestepEmbedder(nn.Module):
    """Embeds scalar times in [0, 1] into vectors: sinusoidal features then an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal features (N, dim) of times t (N,), computed in float32 (checkpoints expect it)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(t.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels; in training, drops labels to the null class (index num_classes) for CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class SiTBlock(nn.Module):
    """Transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # qk-norm as a LayerNorm (older timm's default): checkpoints trained with qk_norm hold its weight and bias
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                              norm_layer=nn.LayerNorm)
        self.attn.fused_attn = fused_attn
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and linear map from tokens to patches."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """Latent diffusion transformer whose forward computes the REPA-E losses on raw (un-normalized) latents."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        z_dims=(768,),
        projector_dim=2048,
        encoder_depth=8,
        bn_momentum=0.1,
        qk_norm=False,
        fused_attn=True,
    ):
        super().__init__()
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth {encoder_depth} must be in [1, depth={depth}]")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.z_dims = list(z_dims)
        self.encoder_depth = encoder_depth

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # fixed sin-cos embedding, kept as a (frozen) parameter because checkpoints store it
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, fused_attn=fused_attn)
            for _ in range(depth)
        ])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z_dim) for z_dim in self.z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # No affine parameters: a learned scale could shrink the latents and game the diffusion loss.
        self.bn = nn.BatchNorm2d(in_channels, eps=1e-4, momentum=bn_momentum, affine=False, track_running_stats=True)
        self.grad_checkpointing = False
        self.initialize_weights()

    def set_grad_checkpointing(self, enabled=True):
        """Recompute each block's activations in the backward instead of keeping them (less memory, more compute)."""
        self.grad_checkpointing = enabled

    def initialize_weights(self):
        """DiT initialization: xavier linears, sin-cos positions, zeroed adaLN and output layers."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        pos_embed = sincos_2d(self.pos_embed.shape[-1], self.x_embedder.grid_size[0])
        self.pos_embed.data.copy_(pos_embed.unsqueeze(0))

        # patch embedding initialized like a linear layer
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """Tokens (N, T, p*p*C) -> latents (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x, t, y):
        """Patch tokens with positions, and the conditioning vector from times t (N,) and labels y (N,)."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        return tokens, c

    def forward(self, x, y, zs, loss_kwargs, time_input=None, noises=None, align_only=False):
        """REPA-E losses for raw latents x (N, C, H, W), labels y (N,), encoder tokens zs (list of (N, T, D)).

        loss_kwargs: path_type ("linear"|"cosine"), prediction ("v"), weighting ("uniform"|"lognormal").
        time_input (N,1,1,1) and noises (like x) are drawn when None.
        align_only stops after block encoder_depth and returns only proj_loss, zs_tilde, time_input, noises.
        """
        path_type = loss_kwargs.get("path_type", "linear")
        if loss_kwargs.get("prediction", "v") != "v":
            raise NotImplementedError(f"prediction {loss_kwargs['prediction']!r}: only 'v' is supported")

        x = self.bn(x)
        if time_input is None:
            time_input = sample_time(x.shape[0], loss_kwargs.get("weighting", "uniform"), path_type)
        time_input = time_input.to(device=x.device, dtype=x.dtype)
        noises = torch.randn_like(x) if noises is None else noises.to(device=x.device, dtype=x.dtype)

        alpha_t, sigma_t, d_alpha_t, d_sigma_t = interpolant(time_input, path_type)
        model_input = alpha_t * x + sigma_t * noises
        model_target = d_alpha_t * x + d_sigma_t * noises

        h, c = self.embed(model_input, time_input.flatten(), y)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            h = checkpoint(block, h, c, use_reentrant=False) if recompute else block(h, c)
            if i + 1 == self.encoder_depth:
                zs_tilde = [projector(h) for projector in self.projectors]
                if align_only:
                    break
        out = dict(proj_loss=repa_loss(zs_tilde, zs), zs_tilde=zs_tilde, time_input=time_input, noises=noises)
        if align_only:
            return out
        model_output = self.unpatchify(self.final_layer(h, c))
        out.update(denoising_loss=mean_flat((model_output - model_target) ** 2), model_output=model_output)
        return out

    @torch.no_grad()
    def inference(self, x, t, y):
        """Predicted velocity for (normalized) x_t at times t (N,) with labels y (N,)."""
        h, c = self.embed(x, t, y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


_SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
}
# Smoke sizes for a CPU, not published ones. T: a 4-block, 192-wide SiT for smoke runs and the demo; its 256-wide
# projector keeps a checkpoint at 12 MB of weights (the published 2048 would make it 33 MB, two thirds of it
# projector). P: a 2-block, 64-wide SiT for the test suite's training runs (under 1 MB of weights).
_SMOKE_SIZES = {"T": dict(depth=4, hidden_size=192, num_heads=3, projector_dim=256),
                "P": dict(depth=2, hidden_size=64, num_heads=2, projector_dim=64)}

SiT_models = {
    f"SiT-{size}/{patch}": functools.partial(SiT, patch_size=patch, **cfg)
    for size, cfg in {**_SIZES, **_SMOKE_SIZES}.items() for patch in (1, 2, 4, 8)
}


def build_sit(model_name, latent_shape, z_dims, *, num_classes, cfg_prob, encoder_depth, bn_momentum=0.1,
              qk_norm=False, fused_attn=True, projector_dim=None):
    """The SiT `model_name` of the registry for latents of latent_shape (C, h, w), one projector per feature width
    in z_dims (the frozen encoders' embedding widths); projector_dim None: the size's own width."""
    channels, size, _ = latent_shape
    projector = {} if projector_dim is None else {"projector_dim": projector_dim}
    return SiT_models[model_name](
        input_size=size, in_channels=channels, num_classes=num_classes, class_dropout_prob=cfg_prob, z_dims=z_dims,
        encoder_depth=encoder_depth, bn_momentum=bn_momentum, qk_norm=qk_norm, fused_attn=fused_attn, **projector)
