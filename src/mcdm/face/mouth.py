"""Upright grayscale mouth crops from 68 landmarks: the lip encoder's input (the ``features`` stage
stores them per frame)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from mcdm.errors import McdmError
from mcdm.face.geometry import check_landmarks

MOUTH_CROP_HW = (32, 48)


MOUTH_CROP_WIDTH_IOD = 1.6  # mouth crop width in inter-ocular distances (the mouth spans ~0.93)


def mouth_boxes(landmarks: np.ndarray, smooth: int = 5) -> np.ndarray:
    """(T, 4) mouth-crop boxes ``cx, cy, angle, iod`` (pixels, radians, pixels): centre = mean of the
    20 mouth points, angle = eye line, scale = inter-ocular distance (stable, unlike the mouth width,
    which changes with expression). Smoothed over ``smooth`` frames so the crop does not jitter."""
    lm = check_landmarks(landmarks, "mouth_boxes")
    el, er = lm[:, 36:42].mean(1), lm[:, 42:48].mean(1)
    d = er - el
    boxes = np.column_stack([lm[:, 48:68].mean(1), np.arctan2(d[:, 1], d[:, 0]), np.linalg.norm(d, axis=1)])
    if smooth > 1 and len(boxes) > 1:
        from scipy.ndimage import uniform_filter1d

        boxes = uniform_filter1d(boxes, size=smooth, axis=0, mode="nearest")
    return boxes.astype(np.float32)


def mouth_crop(frame: np.ndarray, landmarks: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None) -> np.ndarray:
    """(32, 48) uint8 grayscale mouth crop, upright (eye line horizontal), ``MOUTH_CROP_WIDTH_IOD`` wide.

    Give the frame's (68, 2) ``landmarks``, or a ``box`` row of ``mouth_boxes`` (temporally smoothed).
    """
    import cv2

    if box is None:
        if landmarks is None:
            raise McdmError("mouth_crop: give landmarks or a box")
        box = mouth_boxes(np.asarray(landmarks)[None], smooth=1)[0]
    cx, cy, angle, iod = (float(v) for v in box)
    out_h, out_w = MOUTH_CROP_HW
    scale = out_w / max(MOUTH_CROP_WIDTH_IOD * iod, 1e-3)  # output pixels per source pixel
    gray = frame if frame.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    # when shrinking, warp at source resolution first and then area-downsample, so large crops do not alias
    ww, wh = (out_w, out_h) if scale >= 1.0 else (int(math.ceil(out_w / scale)), int(math.ceil(out_h / scale)))
    s = ww / max(MOUTH_CROP_WIDTH_IOD * iod, 1e-3)
    cos, sin = math.cos(-angle) * s, math.sin(-angle) * s
    # dest = s R(-angle) (src - c) + (ww/2, wh/2)
    m = np.array([[cos, -sin, ww / 2.0 - (cos * cx - sin * cy)], [sin, cos, wh / 2.0 - (sin * cx + cos * cy)]])
    crop = cv2.warpAffine(gray, m, (ww, wh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if (ww, wh) != (out_w, out_h):
        crop = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA)
    return crop.astype(np.uint8)
