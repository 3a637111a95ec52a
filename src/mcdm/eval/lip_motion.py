"""A direct, SyncNet-free lip measure (issue #20): does the generated mouth open and close WHEN the
ground truth's does?

Mouth opening of a frame from its 68 dlib landmarks (iBUG numbering, 0-based): the mean gap of the
three inner-lip pairs, upper 61, 62, 63 against lower 67, 66, 65, in units of the outer eye corners'
distance (36-45), so that it does not depend on the face's size in the crop:

    o = (1/3) sum_{k=0..2} |p_{61+k} - p_{67-k}| / |p_45 - p_36|

Per clip, the Pearson correlation over time of the generated opening against ground truth's (the
same dlib landmarks on both, frame by frame):

    r = sum_t (g_t - g_bar)(o_t - o_bar) / sqrt(sum_t (g_t - g_bar)^2 sum_t (o_t - o_bar)^2)

Ground-truth frames without a face are the data's: left out of that clip's pairs. A GENERATED frame
without a face is the model's failure and is charged, never dropped: its opening is set to the mean
of the clip's generated openings, which adds nothing to the covariance and pulls r towards 0. A
clip whose generated mouth never moves (zero variance, or fewer than 2 generated faces) scores
r = 0: no evidence that the mouth follows the speech. A clip whose ground truth never moves has no r
and is counted. The pooled value is the mean of the clips' r (each clip one unit) with its
percentile-bootstrap interval over clips (``statistics.bootstrap_ci``); ``std_ratio`` is the
generated opening's standard deviation over ground truth's (pooled over clips): does the mouth move
as much, whether or not in time.
"""
from __future__ import annotations

import numpy as np

from mcdm.errors import McdmError
from mcdm.eval.statistics import bootstrap_ci

BACKEND = "dlib-68-inner-lip-gap/outer-eye-corners:pearson-per-clip"
UPPER, LOWER = (61, 62, 63), (67, 66, 65)
EYE_CORNERS = (36, 45)


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """(T,) mouth opening of (T, 68, 2) landmarks (NaN where a frame has no landmarks)."""
    lm = np.asarray(landmarks, np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (68, 2):
        raise McdmError(f"mouth_opening: expected (T, 68, 2) landmarks, got {lm.shape}")
    gap = np.linalg.norm(lm[:, list(UPPER)] - lm[:, list(LOWER)], axis=2).mean(axis=1)
    scale = np.linalg.norm(lm[:, EYE_CORNERS[1]] - lm[:, EYE_CORNERS[0]], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, gap / scale, np.nan)


def clip_correlation(real_opening: np.ndarray, fake_opening: np.ndarray) -> dict:
    """The module docstring's r for one clip (paired by frame index, cut to the common length):
    ``{"r", "frames", "no_face_frames", "real_std", "fake_std"}``; ``r`` None when ground truth's
    mouth has no variance (or fewer than 2 frames with a face)."""
    n = min(len(real_opening), len(fake_opening))
    real = np.asarray(real_opening, np.float64)[:n]
    fake = np.asarray(fake_opening, np.float64)[:n].copy()
    keep = np.isfinite(real)
    real, fake = real[keep], fake[keep]
    lost = ~np.isfinite(fake)
    out = {"frames": int(len(real)), "no_face_frames": int(lost.sum()), "real_std": None, "fake_std": None, "r": None}
    if len(real) < 2 or np.ptp(real) == 0:
        return out
    out["real_std"] = float(np.std(real))
    if (~lost).sum() < 2:
        out.update(fake_std=0.0, r=0.0)
        return out
    fake[lost] = fake[~lost].mean()
    out["fake_std"] = 0.0 if np.ptp(fake) == 0 else float(np.std(fake))
    out["r"] = 0.0 if np.ptp(fake) == 0 else float(np.corrcoef(real, fake)[0, 1])
    return out


def mouth_correlation(real_landmarks: list, fake_landmarks: list, level: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> tuple[dict, list[dict]]:
    """Per video pair (``(T, 68, 2)`` landmarks, NaN where no face), ``clip_correlation`` of their
    openings; returns (flat pooled dict ``mouth_open_corr`` with ``_low`` / ``_high`` (the bootstrap
    interval over clips; null with fewer than 2 clips), ``_n`` clips, ``_no_face_frames``,
    ``_clips_without_motion``, ``mouth_open_std_ratio``, backend; the per-clip dicts)."""
    if len(real_landmarks) != len(fake_landmarks):
        raise McdmError(f"mouth_open_corr: {len(real_landmarks)} real videos but {len(fake_landmarks)} generated")
    per_clip = [clip_correlation(mouth_opening(r), mouth_opening(f)) for r, f in zip(real_landmarks, fake_landmarks)]
    scored = [c for c in per_clip if c["r"] is not None]
    if not scored:
        raise McdmError("mouth_open_corr: no clip whose ground-truth mouth moves (with a face in 2+ frames)")
    values = np.array([c["r"] for c in scored])
    ci = bootstrap_ci(values, level=level, n_boot=n_boot, seed=seed) if len(values) >= 2 else None
    real_sd = np.sqrt(np.mean([c["real_std"] ** 2 for c in scored]))
    fake_sd = np.sqrt(np.mean([c["fake_std"] ** 2 for c in scored]))
    pooled = {"mouth_open_corr": float(values.mean()), "mouth_open_corr_low": None if ci is None else ci.low,
              "mouth_open_corr_high": None if ci is None else ci.high, "mouth_open_corr_n": len(scored),
              "mouth_open_corr_no_face_frames": int(sum(c["no_face_frames"] for c in per_clip)),
              "mouth_open_corr_clips_without_motion": len(per_clip) - len(scored),
              "mouth_open_corr_backend": BACKEND, "mouth_open_std_ratio": float(fake_sd / real_sd)}
    return pooled, per_clip
