"""wo_fpc's present-clip conditioning (paper Table 4): audio windows instead of the present-clip prior."""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange

from mcdm.models.motion_encoders import frame_windows


class AudioWindowTokens(ModelMixin, ConfigMixin):
    """wo_fpc's present-clip conditioning (paper Table 4: the present-clip prior replaced by an audio
    attention fed audio features): per frame f the audio features of frames f - w .. f + w,
    standardised per channel with the training frames' statistics. (B, F, A) -> (B, F, 2w + 1, A)."""

    @register_to_config
    def __init__(self, audio_dim: int = 80, audio_window: int = 2):
        super().__init__()
        self.register_buffer("audio_mean", torch.zeros(audio_dim))
        self.register_buffer("audio_std", torch.ones(audio_dim))

    @torch.no_grad()
    def fit(self, frames: torch.Tensor) -> "AudioWindowTokens":
        self.audio_mean.copy_(frames.float().mean(0))
        self.audio_std.copy_(frames.float().std(0).clamp(min=1e-3) if len(frames) > 1 else torch.ones_like(frames[0]))
        return self

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        a = (audio.float() - self.audio_mean) / self.audio_std
        windows = frame_windows(rearrange(a, "b f a -> f b a"), 2 * self.config.audio_window + 1)
        return rearrange(windows, "f w b a -> b f w a").to(audio.dtype)
