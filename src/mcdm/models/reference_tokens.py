"""Reference tokens: the reference frame's latent as ``m`` tokens of width ``d`` for cross-attention.

In the UNet pretraining (decisions.md #1) these tokens are the ``encoder_hidden_states`` of the SD-shaped
UNet, where SD-1.5 had CLIP text tokens: the UNet learns to denoise a frame while looking at another
frame of the same face. Saved beside the UNet as its own model (``models/base/ref_tokens/``).

    tokens = LayerNorm(Conv_{p x p, stride p}(z_ref) + E_pos),   (B, C, h, w) -> (B, (h/p)(w/p), d)
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn


class ReferenceTokens(ModelMixin, ConfigMixin):
    """Learnable patchify of a reference latent into ``(sample_size / patch_size)^2`` tokens."""

    @register_to_config
    def __init__(self, latent_channels: int = 4, sample_size: int = 8, patch_size: int = 2, dim: int = 64):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"ReferenceTokens: patch_size {patch_size} does not divide sample_size {sample_size}")
        side = sample_size // patch_size
        self.patchify = nn.Conv2d(latent_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, side * side, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    @property
    def num_tokens(self) -> int:
        return (self.config.sample_size // self.config.patch_size) ** 2

    def forward(self, ref_latent: torch.Tensor) -> torch.Tensor:
        # 1. patchify: (B, C, h, w) -> (B, d, h/p, w/p)
        x = self.patchify(ref_latent)
        # 2. tokens with positions: (B, m, d)
        x = rearrange(x, "b d h w -> b (h w) d") + self.pos_embed
        # 3. normalise (the scale cross-attention keys expect)
        return self.norm(x)
