"""The generated face crop pasted back into the portrait it came from, at the portrait's resolution.

The crop is the square ``(l, t, r, b)`` of the portrait that :func:`mcdm.face.tracks.crop_square` resized
to the model's side; pasting undoes it: the generated crop is resized to the square's side and blended
into the portrait through a feathered ellipse around the face (the hair, neck and background stay the
portrait's own, sharp), after its colours are matched to the portrait's around the seam: mean and
standard deviation per LAB channel on the ring where the mask fades (Reinhard et al. 2001), so the
blend has no visible edge. Over a video the generated side's statistics are a running mean
(``smoothing`` = the weight of each new frame), so the correction does not flicker from frame to frame.
A square that reaches past the portrait's border (a face at the edge) is pasted where it overlaps.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

ELLIPSE_AXES = (0.40, 0.42)  # half-axes of the face ellipse, fractions of the square's side
ELLIPSE_CENTRE = (0.50, 0.50)  # the crop centres the face box (data.crop_scale x its side)


def ellipse_mask(side: int, feather: float = 0.08, axes=ELLIPSE_AXES, centre=ELLIPSE_CENTRE) -> np.ndarray:
    """(side, side) float32 in [0, 1]: 1 on the face, 0 outside, a Gaussian edge ``feather * side`` wide
    kept inside the ellipse (eroded first, so the mask is 0 well before the square's edge)."""
    mask = np.zeros((side, side), np.float32)
    cv2.ellipse(mask, (int(round(centre[0] * side)), int(round(centre[1] * side))),
                (max(1, int(axes[0] * side)), max(1, int(axes[1] * side))), 0, 0, 360, 1.0, -1)
    k = max(3, int(feather * side) | 1)
    mask = cv2.erode(mask, np.ones((k // 2 + 1, k // 2 + 1), np.uint8))
    return cv2.GaussianBlur(mask, (0, 0), sigmaX=k / 3)


def seam_ring(mask: np.ndarray) -> np.ndarray:
    """Boolean ring where the mask fades (0.05 < m < 0.95), widened a little: the pixels that meet."""
    ring = ((mask > 0.05) & (mask < 0.95)).astype(np.uint8)
    return cv2.dilate(ring, np.ones((5, 5), np.uint8)).astype(bool)


def lab_stats(rgb: np.ndarray, where: np.ndarray) -> np.ndarray:
    """(2, 3): mean and standard deviation of each LAB channel over the pixels ``where``."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)[where]
    return np.stack([lab.mean(0), lab.std(0) + 1e-3])


def transfer(rgb: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``rgb`` with its LAB statistics moved from ``source`` to ``target`` (scale clipped to [0.5, 2])."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    scale = np.clip(target[1] / source[1], 0.5, 2.0)
    lab = (lab - source[0]) * scale + target[0]
    return cv2.cvtColor(np.clip(lab, 0, 255).round().astype(np.uint8), cv2.COLOR_LAB2RGB)


class FacePaster:
    """Paste generated crops into ``portrait`` (H, W, 3 uint8) at its square ``(l, t, r, b)``."""

    def __init__(self, portrait: np.ndarray, square, feather: float = 0.08, colour_match: bool = True,
                 smoothing: float = 0.2):
        self.portrait = np.ascontiguousarray(portrait, np.uint8)
        h, w = self.portrait.shape[:2]
        l, t, r, b = (int(round(v)) for v in square)
        self.side = r - l
        if self.side < 2 or b - t != self.side:
            raise ValueError(f"paste: the crop region must be a square, got {square}")
        # the part of the square inside the portrait, in portrait and in square coordinates
        self.x0, self.y0, self.x1, self.y1 = max(l, 0), max(t, 0), min(r, w), min(b, h)
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"paste: the square {square} lies outside the {w}x{h} portrait")
        self.inner = (slice(self.y0 - t, self.y1 - t), slice(self.x0 - l, self.x1 - l))
        self.mask = ellipse_mask(self.side, feather)[self.inner]
        self.alpha = self.mask[..., None]
        self.original = self.portrait[self.y0:self.y1, self.x0:self.x1]
        self.colour_match = colour_match
        self.smoothing = float(smoothing)
        self.ring = seam_ring(self.mask)
        self.target = lab_stats(self.original, self.ring) if colour_match and self.ring.any() else None
        self.source: Optional[np.ndarray] = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames it returns."""
        return self.portrait.shape[1], self.portrait.shape[0]

    def face(self, crop: np.ndarray) -> np.ndarray:
        """The generated crop at the square's side, cut to the part inside the portrait, colours matched."""
        crop = np.ascontiguousarray(crop, np.uint8)
        interp = cv2.INTER_CUBIC if crop.shape[0] < self.side else cv2.INTER_AREA
        face = cv2.resize(crop, (self.side, self.side), interpolation=interp)[self.inner]
        if self.target is None:
            return face
        stats = lab_stats(face, self.ring)
        self.source = stats if self.source is None else (1 - self.smoothing) * self.source + self.smoothing * stats
        return transfer(face, self.source, self.target)

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        """One full frame: the portrait with the generated face blended in."""
        face = self.face(crop).astype(np.float32)
        out = self.portrait.copy()
        out[self.y0:self.y1, self.x0:self.x1] = (self.alpha * face + (1 - self.alpha) * self.original).round().astype(np.uint8)
        return out
