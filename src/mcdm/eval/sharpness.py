"""Sharpness of generated frames against ground truth's, and their PSNR (issue #20).

Sharpness of a frame: the variance of its Laplacian (Pech-Pacheco et al. 2000), on the grayscale
frame (ITU-R BT.601 luma, as ``cv2.COLOR_RGB2GRAY``) at the crop's own resolution, with the 3 x 3
kernel [[0, 1, 0], [1, -4, 1], [0, 1, 0]] and reflected borders (``cv2.Laplacian``, ksize 1):

    s(x) = Var_pixels(Laplacian(gray(x)))

``sharpness_ratio`` = mean s over the generated frames / mean s over their ground-truth frames
(the videos paired by index and cut to their common length): 1 is as sharp as the data, below 1
blurred, far above 1 noise. The issue's target: within 50% (0.5 to 1.5).

PSNR of generated (or reconstructed) frames against ground truth: ``mcdm.models.vae.psnr`` over all
pixels of all frames (the MSE pooled, then 10 log10(255^2 / MSE)), the definition the tiny VAE's
held-out gate uses, so the autoencoder ceiling's PSNR on the test clips compares with it.
"""
from __future__ import annotations

import cv2
import numpy as np

from mcdm.errors import McdmError
from mcdm.eval.detectors import as_videos
from mcdm.eval.metrics import MetricResult
from mcdm.models.vae import psnr

SHARPNESS_BACKEND = "variance-of-laplacian:3x3-gray-same-resolution"
PSNR_BACKEND = "psnr:pooled-mse-uint8"


def laplacian_variance(frames: np.ndarray) -> np.ndarray:
    """(N,) variance of the Laplacian of each (N, H, W, 3) uint8 RGB frame."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise McdmError(f"sharpness: expected (N, H, W, 3) frames, got {frames.shape}")
    return np.array([cv2.Laplacian(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
                     for f in frames], np.float64)


def _paired(real_videos, fake_videos) -> list[tuple[np.ndarray, np.ndarray]]:
    real, fake = as_videos(real_videos, "real videos"), as_videos(fake_videos, "fake videos")
    if len(real) != len(fake):
        raise McdmError(f"{len(real)} real videos but {len(fake)} generated")
    pairs = []
    for r, f in zip(real, fake):
        n = min(len(r), len(f))
        if r.shape[1:] != f.shape[1:]:
            raise McdmError(f"frame sizes differ (real {r.shape[1:3]}, generated {f.shape[1:3]})")
        pairs.append((np.asarray(r[:n]), np.asarray(f[:n])))
    return pairs


def sharpness_ratio(real_videos, fake_videos) -> MetricResult:
    """The module docstring's ratio; ``details``: both means (``real``, ``fake``)."""
    pairs = _paired(real_videos, fake_videos)
    real = np.concatenate([laplacian_variance(r) for r, _ in pairs])
    fake = np.concatenate([laplacian_variance(f) for _, f in pairs])
    if not len(real) or real.mean() == 0:
        raise McdmError("sharpness_ratio: the ground-truth frames have no texture (Laplacian variance 0)")
    return MetricResult("sharpness_ratio", float(fake.mean() / real.mean()), SHARPNESS_BACKEND, int(len(fake)),
                        {"real": float(real.mean()), "fake": float(fake.mean())})


def psnr_metric(real_videos, fake_videos) -> MetricResult:
    """PSNR (dB) of all generated frames against their ground truth, MSE pooled over every pixel."""
    pairs = _paired(real_videos, fake_videos)
    real = np.concatenate([r for r, _ in pairs])
    fake = np.concatenate([f for _, f in pairs])
    return MetricResult("psnr", psnr(real, fake), PSNR_BACKEND, int(len(fake)))
