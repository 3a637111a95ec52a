"""Motion encoders of the present-clip motion prior (paper Sec. 3.3; our design, decisions.md #3).

- head:       head pose (pitch, yaw, roll, tx, ty, tz) fitted per frame from the 68 landmarks
              (:func:`mcdm.face.geometry.head_pose_from_landmarks`); ``HeadPoseEncoder`` only standardises it.
- lip:        ``LipEncoder`` on a window of grayscale mouth crops, trained with InfoNCE against
              ``LipAudioEncoder`` on audio windows; negatives are the same clip's audio shifted in
              time (random shifts) plus the other clips of the batch (SyncNet-style objective).
- expression: ``ExpressionEncoder`` on pose-normalised 68-landmark offsets (similarity-Procrustes
              alignment on the rigid points, minus the clip's neutral face), trained as a denoising
              autoencoder through an ``expression_dim`` bottleneck. Its code is the expression token.

The ``motion_encoders`` stage trains them (:mod:`mcdm.train.motion_encoders`); they are frozen after.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from mcdm.errors import McdmError
from mcdm.face.geometry import HEAD_POSE_DIM, N_LANDMARKS, expression_offsets
from mcdm.models.loading import load_strict


# =============================================================================================
# Motion encoders (trained by the motion_encoders stage, frozen after)
# =============================================================================================
def _standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


class HeadPoseEncoder(ModelMixin, ConfigMixin):
    """Head token = head pose (T, 6) standardised with the training clips' mean / std (no weights)."""

    @register_to_config
    def __init__(self, head_dim: int = HEAD_POSE_DIM):
        super().__init__()
        self.register_buffer("token_mean", torch.zeros(head_dim))
        self.register_buffer("token_std", torch.ones(head_dim))

    def fit(self, poses: torch.Tensor) -> "HeadPoseEncoder":
        self.token_mean.copy_(poses.mean(0))
        self.token_std.copy_(poses.std(0).clamp(min=1e-3))
        return self

    def forward(self, head_pose: torch.Tensor) -> torch.Tensor:
        return _standardise(head_pose.float().to(self.token_mean.device), self.token_mean, self.token_std)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.token_std + self.token_mean


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU())


def frame_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(T, ...) -> (T, window, ...): the ``window`` frames centred on each frame, edges repeated."""
    half = window // 2
    steps = torch.arange(-half, window - half, device=x.device)
    idx = (torch.arange(x.shape[0], device=x.device)[:, None] + steps[None]).clamp(0, x.shape[0] - 1)
    return x[idx]


class LipEncoder(ModelMixin, ConfigMixin):
    """Lip token from a window of grayscale mouth crops (window frames stacked as channels, SyncNet's
    early fusion): (B, W, 32, 48) -> (B, lip_dim). Trained with InfoNCE against ``LipAudioEncoder``."""

    @register_to_config
    def __init__(self, window: int = 5, lip_dim: int = 16, channels: Sequence[int] = (16, 32, 64)):
        super().__init__()
        layers, c_prev = [], window
        for i, c in enumerate(channels):
            layers.append(_conv_block(c_prev, c, stride=1 if i == 0 else 2))
            c_prev = c
        self.convs = nn.Sequential(*layers, _conv_block(c_prev, c_prev, 2))
        self.proj = nn.Linear(c_prev, lip_dim)
        self.register_buffer("token_mean", torch.zeros(lip_dim))
        self.register_buffer("token_std", torch.ones(lip_dim))

    def forward(self, mouth_windows: torch.Tensor) -> torch.Tensor:
        """Unit-norm embedding (the contrastive space)."""
        x = mouth_windows.float()
        x = (x / 255.0 - 0.5) / 0.25 if mouth_windows.dtype == torch.uint8 else x
        h = self.convs(x).mean((-2, -1))  # (B, C)
        return F.normalize(self.proj(h), dim=-1)

    @torch.no_grad()
    def encode_clip(self, mouth_crops: torch.Tensor) -> torch.Tensor:
        """(T, 32, 48) uint8 mouth crops -> (T, lip_dim) standardised lip tokens."""
        windows = frame_windows(mouth_crops.to(self.device), self.config.window)
        emb = torch.cat([self(w) for w in windows.split(256)])
        return _standardise(emb * math.sqrt(self.config.lip_dim), self.token_mean, self.token_std)


class LipAudioEncoder(ModelMixin, ConfigMixin):
    """Audio side of the lip contrastive objective: (B, W, A) audio window -> (B, lip_dim) unit norm.

    Audio features are standardised per channel with statistics of the training frames (``fit``), not
    per frame: a per-frame LayerNorm would erase loudness, the strongest cue of mouth opening."""

    @register_to_config
    def __init__(self, audio_dim: int = 80, window: int = 5, lip_dim: int = 16, hidden: int = 128):
        super().__init__()
        self.register_buffer("audio_mean", torch.zeros(audio_dim))
        self.register_buffer("audio_std", torch.ones(audio_dim))
        self.conv = nn.Sequential(nn.Conv1d(audio_dim, hidden, 3, padding=1), nn.SiLU(), nn.Conv1d(hidden, hidden, 3, padding=1), nn.SiLU())
        self.proj = nn.Linear(hidden * window, lip_dim)

    def fit(self, audio_frames: torch.Tensor) -> "LipAudioEncoder":
        """Per-channel mean / std of (N, A) training audio frames."""
        self.audio_mean.copy_(audio_frames.float().mean(0))
        self.audio_std.copy_(audio_frames.float().std(0).clamp(min=1e-3))
        return self

    def forward(self, audio_windows: torch.Tensor) -> torch.Tensor:
        a = _standardise(audio_windows.float(), self.audio_mean, self.audio_std)
        h = self.conv(rearrange(a, "b w a -> b a w"))
        return F.normalize(self.proj(rearrange(h, "b c w -> b (c w)")), dim=-1)


class ExpressionEncoder(ModelMixin, ConfigMixin):
    """Expression token from pose-normalised landmark offsets: MLP encoder to an ``expression_dim``
    bottleneck and an MLP decoder, trained as a denoising autoencoder (see module docstring)."""

    @register_to_config
    def __init__(self, in_dim: int = 2 * N_LANDMARKS, expression_dim: int = 16, hidden: int = 128):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, expression_dim))
        self.decoder = nn.Sequential(nn.Linear(expression_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, in_dim))
        self.register_buffer("input_scale", torch.ones(()))  # global std of the training offsets
        self.register_buffer("token_mean", torch.zeros(expression_dim))
        self.register_buffer("token_std", torch.ones(expression_dim))

    def forward(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 136) offsets -> (code, reconstruction in offset units)."""
        code = self.encoder(offsets.float() / self.input_scale)
        return code, self.decoder(code) * self.input_scale

    @torch.no_grad()
    def encode_clip(self, offsets: torch.Tensor) -> torch.Tensor:
        """(T, 136) offsets -> (T, expression_dim) standardised expression tokens."""
        code = self.encoder(offsets.float().to(self.device) / self.input_scale)
        return _standardise(code, self.token_mean, self.token_std)


# =============================================================================================
# The motion tokens of a clip (what stage 2 denoises and what F_pc is made from)
# =============================================================================================
@dataclass
class MotionEncoders:
    head: HeadPoseEncoder
    lip: LipEncoder
    lip_audio: LipAudioEncoder
    expression: ExpressionEncoder

    SUBFOLDERS = ("head", "lip", "lip_audio", "expression")

    def save(self, out_dir: str | Path) -> None:
        for name in self.SUBFOLDERS:
            getattr(self, name).save_pretrained(Path(out_dir) / name)

    @classmethod
    def load(cls, directory: str | Path) -> "MotionEncoders":
        directory = Path(directory)
        if not directory.is_dir():
            raise McdmError(f"missing {directory}: run `dvc repro motion_encoders` first")
        kinds = {"head": HeadPoseEncoder, "lip": LipEncoder, "lip_audio": LipAudioEncoder, "expression": ExpressionEncoder}
        return cls(**{n: load_strict(kinds[n], directory / n).requires_grad_(False) for n in cls.SUBFOLDERS})

    @property
    def dims(self) -> dict[str, int]:
        return {"head": self.head.config.head_dim, "lip": self.lip.config.lip_dim, "expression": self.expression.config.expression_dim}

    @torch.no_grad()
    def tokens(self, features: dict) -> dict[str, torch.Tensor]:
        """Per-frame motion tokens of a whole clip from its feature file's arrays:
        ``head_pose`` (T, 6), ``mouth_crops`` (T, 32, 48) uint8, ``landmarks`` (T, 68, 2) ->
        ``head`` (T, 6), ``lip`` (T, lip_dim), ``expression`` (T, expression_dim), all standardised."""
        missing = [k for k in ("head_pose", "mouth_crops", "landmarks") if k not in features]
        if missing:
            raise McdmError(f"motion tokens: feature file lacks {', '.join(missing)}")
        head_pose = torch.as_tensor(np.asarray(features["head_pose"])).float()
        mouths = torch.as_tensor(np.asarray(features["mouth_crops"]))
        offsets = torch.as_tensor(expression_offsets(np.asarray(features["landmarks"])))
        return {"head": self.head(head_pose), "lip": self.lip.encode_clip(mouths), "expression": self.expression.encode_clip(offsets)}
