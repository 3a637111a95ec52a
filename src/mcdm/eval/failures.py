"""How a lost face counts against the model (the face-based fallback metrics never drop it).

The fallback metrics read faces found by dlib: FID (descriptor per frame), E-FID (landmarks per
frame), the FVD fallback (landmarks and descriptors per clip) and identity (descriptor per frame).
A GENERATED frame without a face is the model's failure. Leaving it out would let a worse model
score better by losing its face, so every such metric keeps the frame and charges it:

* per-frame values (identity distance to the reference): the frame scores
  ``IDENTITY_FAILURE_DISTANCE`` = 1.0, beyond dlib's same-person threshold (0.6) and the distance
  between two unrelated faces (astronaut vs Grace Hopper: 0.7); see ``statistics.penalised``;
* Fréchet distances (FID, E-FID, FVD fallback): the frame's (clip's) feature row becomes the
  no-face point zeta of :func:`no_face_feature`, one real range beyond the real set's maximum in
  every coordinate,

      zeta_j = max_i x_ij + (max_i x_ij - min_i x_ij),

  a point no real face occupies. The generated set keeps its size, and each lost face moves its
  Gaussian towards zeta. 1-D example: real {0, 1, 2}, generated {0, lost, 2}: zeta = 4, generated
  {0, 4, 2} (mean 2, variance 4) against real (mean 1, variance 1): d^2 = 1 + (1 - 2)^2 = 2; dropping
  the lost frame instead gave {0, 2}: d^2 = (sqrt(1) - sqrt(2))^2 = 0.17. (A generated set already
  farther from the real one than zeta on the far side can be pulled back by it: such a set fails
  the metric anyway.)

Beside every such metric the failure rate is reported with its Wilson interval
(``statistics.failure_rate``). A REAL (ground-truth) frame without a face is the data's: it is left
out of the real set and counted (``no_face_frames_real``).
"""
from __future__ import annotations

import numpy as np

from mcdm.errors import McdmError

IDENTITY_FAILURE_DISTANCE = 1.0


def finite_rows(features: np.ndarray) -> np.ndarray:
    """(N,) True where a feature row (any trailing shape) holds no NaN / inf."""
    x = np.asarray(features, np.float64)
    return np.isfinite(x.reshape(len(x), -1)).all(axis=1)


def no_face_feature(real: np.ndarray) -> np.ndarray:
    """zeta (D,): one real range beyond the real features' maximum in every coordinate (rows with a
    NaN, i.e. real frames without a face, are ignored)."""
    x = np.asarray(real, np.float64)
    x = x[finite_rows(x)]
    if len(x) == 0:
        raise McdmError("no real feature row to place the no-face point by (no face in any real frame)")
    high, low = x.max(axis=0), x.min(axis=0)
    return high + (high - low)


def penalised_features(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(real rows with a face, fake rows with every lost face replaced by zeta, the fake failure mask).

    real: (N1, D) with NaN rows where the ground truth has no face (dropped: the data's);
    fake: (N2, D) with NaN rows where the model lost the face (kept, as zeta: the model's)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    ok_r, ok_f = finite_rows(real), finite_rows(fake)
    out = fake.copy()
    if (~ok_f).any():
        out[~ok_f] = no_face_feature(real)
    return real[ok_r], out, ~ok_f


def penalised_identity(distances: np.ndarray) -> np.ndarray:
    """Per-frame identity distances with NaN (no face) charged ``IDENTITY_FAILURE_DISTANCE``."""
    d = np.asarray(distances, np.float64)
    return np.where(np.isfinite(d), d, IDENTITY_FAILURE_DISTANCE)
