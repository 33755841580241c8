"""The networks a training step uses, as both trainers hold them. Importing this module imports no torch (the
trainers subclass SiTNets at import time, and their --help answers at once)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class FrozenEncoders:
    """The frozen representation encoders REPA aligns to, with their type names (weights.encoders.load_encoders)."""
    encoders: list
    types: list

    @property
    def embed_dims(self):
        """Feature width of each encoder: the SiT's projector outputs."""
        return [encoder.embed_dim for encoder in self.encoders]

    def features(self, raw_image, accelerator):
        """Patch tokens of each encoder for a uint8 batch."""
        import torch

        from models.encoders import encoder_patch_tokens, preprocess_raw_image

        with torch.no_grad(), accelerator.autocast():
            return [encoder_patch_tokens(encoder, enc_type, preprocess_raw_image(raw_image, enc_type))
                    for encoder, enc_type in zip(self.encoders, self.types)]


@dataclass
class SiTNets:
    """What a SiT update uses, as accelerate prepared it: frozen encoders, the SiT, its EMA and optimizer."""
    encoders: FrozenEncoders
    sit: torch.nn.Module
    ema: torch.nn.Module
    opt_sit: torch.optim.Optimizer
