"""The landmark guider (Moore-AnimateAnyone's pose guider; decisions.md #4): trained in stage 1, frozen after."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from mcdm.face.heatmaps import render_landmark_heatmaps


class LandmarkGuider(ModelMixin, ConfigMixin):
    """Landmark guider (Moore-AnimateAnyone's pose guider): landmark images (N, 1, H, W) ->
    - ``forward``: (N, embedding_channels, H / 2^k, W / 2^k) with k = len(block_out_channels) - 1, from a
      zero-initialised output conv (added to the UNet's noisy latents in stage 1; starts as no-op);
    - ``tokens``: (N, 4 * block_out_channels[-1]) the last features average-pooled to 2 x 2 (the
      landmark / head condition tokens of the present-clip prior). Trained in stage 1, frozen after.
    Choose ``block_out_channels`` so that 2^k equals the VAE's downsampling factor."""

    @register_to_config
    def __init__(self, conditioning_channels: int = 1, embedding_channels: int = 4, block_out_channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(conditioning_channels, chans[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2), nn.SiLU()]
        self.blocks = nn.Sequential(*blocks)
        self.conv_out = nn.Conv2d(chans[-1], embedding_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def token_dim(self) -> int:
        return 4 * int(self.config.block_out_channels[-1])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(F.silu(self.conv_in(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.features(images))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(images), 2).flatten(1)

    def landmark_tokens(self, landmarks: torch.Tensor, image_size: int) -> torch.Tensor:
        """(B, F, 68, 2) crop-pixel landmarks -> (B, F, token_dim) landmark tokens for the prior."""
        b = landmarks.shape[0]
        images = render_landmark_heatmaps(rearrange(landmarks, "b f p c -> (b f) p c").cpu(), image_size).to(self.device)
        return rearrange(self.tokens(images), "(b f) d -> b f d", b=b)
