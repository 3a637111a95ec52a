"""Landmark heat maps: the landmark guider's input images."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from mcdm.face.geometry import N_LANDMARKS


def render_landmark_heatmaps(landmarks: np.ndarray | torch.Tensor, size: int, sigma: Optional[float] = None) -> torch.Tensor:
    """(..., 1, size, size) landmark images for the landmark guider: max over the 68 points of a
    Gaussian blob exp(-|p - l_i|^2 / (2 sigma^2)), sigma = size / 64 (at least 1 pixel).

    The blob is separable, exp(-(y - l_y)^2 / 2s^2) exp(-(x - l_x)^2 / 2s^2): 68 (H + W) exponentials
    and one product per pixel instead of 68 H W exponentials (the training stages' data loading was
    dominated by them)."""
    lm = torch.as_tensor(np.asarray(landmarks) if not torch.is_tensor(landmarks) else landmarks).float()
    lead = lm.shape[:-2]
    lm = lm.reshape(-1, N_LANDMARKS, 2)
    sigma = float(sigma or max(size / 64.0, 1.0))
    grid = torch.arange(size, dtype=torch.float32)
    out = []
    per_chunk = max(1, int(2e7 // (N_LANDMARKS * size * size)))  # bounds the (n, 68, H, W) buffer to ~80 MB
    for chunk in lm.split(per_chunk):
        gx = torch.exp(-((grid[None, None, :] - chunk[..., 0:1]) ** 2) / (2 * sigma**2))  # (n, 68, W)
        gy = torch.exp(-((grid[None, None, :] - chunk[..., 1:2]) ** 2) / (2 * sigma**2))  # (n, 68, H)
        out.append((gy[..., :, None] * gx[..., None, :]).amax(1))  # (n, 68, H, W) -> (n, H, W)
    return torch.cat(out).reshape(*lead, 1, size, size)
