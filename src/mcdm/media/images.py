"""Pictures of frames: a grid of frames as one image."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from mcdm.errors import McdmError


def image_grid(frames, ncols: Optional[int] = None) -> np.ndarray:
    """Tile N frames, (N, H, W, C) or (N, C, H, W) with C in {1, 3}, uint8 or float in [0, 1], into
    one (rows*H, cols*W, 3) uint8 image; missing cells are black."""
    from einops import rearrange

    x = frames.detach().cpu().float().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise McdmError(f"image grid: expected (N, H, W, C) or (N, C, H, W) frames, got shape {x.shape}")
    if x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = rearrange(x, "n c h w -> n h w c")
    if x.dtype != np.uint8:
        x = (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    n = len(x)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    pad = np.zeros((nrows * ncols - n, *x.shape[1:]), dtype=np.uint8)
    return rearrange(np.concatenate([x, pad]), "(r c) h w ch -> (r h) (c w) ch", r=nrows)
