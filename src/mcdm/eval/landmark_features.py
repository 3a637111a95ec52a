"""The landmark fallbacks of the expression and video metrics (no downloaded weights: dlib's shipped,
pretrained face models give the landmarks and descriptors):

- ``landmark-expression-offsets`` (E-FID): 68 landmarks Procrustes-aligned (rotation, scale,
  translation, fitted on the rigid nose + eye points) to a canonical mean template, minus that
  template, on the mouth, brow and eye points: 84 numbers per frame in inter-ocular-distance units.
- ``fvd-fallback:dlib-descriptor+landmark-dynamics`` (FVD): per 16-frame clip, appearance (mean and
  std over the clip of the face descriptor), motion (amplitude spectra of the frame-to-frame
  velocities of mouth / eye / brow / head-pose signals from the landmarks), the clip's mean of those
  signals, and the spectrum of the frame-difference energy.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm import tqdm

from mcdm.errors import McdmError
from mcdm.eval.face_features import DESCRIPTOR_DIM, DlibFrameFeatures
from mcdm.face.dlib import BROWS, EYE_L, EYE_R, MOUTH, NOSE

# ---------------------------------------------------------------------------------------------
# input normalisation


# ---------------------------------------------------------------------------------------------
# TorchScript detectors given by local path


# ---------------------------------------------------------------------------------------------
# dlib per-frame analysis, cached by frame content


# ---------------------------------------------------------------------------------------------
# landmark geometry: Procrustes alignment and expression offsets

RIGID = np.r_[NOSE.start:NOSE.stop, EYE_L.start:EYE_L.stop, EYE_R.start:EYE_R.stop]  # alignment anchors
EXPRESSION = np.r_[MOUTH.start:MOUTH.stop, BROWS.start:BROWS.stop, EYE_L.start:EYE_L.stop, EYE_R.start:EYE_R.stop]


def fill_missing(landmarks: np.ndarray) -> np.ndarray:
    """Linear interpolation over time of frames whose landmarks are NaN (edges: nearest frame)."""
    lm = np.array(landmarks, np.float64)
    ok = np.isfinite(lm).all(axis=(1, 2))
    if ok.all() or not ok.any():
        return lm
    t = np.arange(len(lm))
    flat = lm.reshape(len(lm), -1)
    for j in range(flat.shape[1]):
        flat[~ok, j] = np.interp(t[~ok], t[ok], flat[ok, j])
    return flat.reshape(lm.shape)


def _eye_centres(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return lm[..., EYE_L, :].mean(axis=-2), lm[..., EYE_R, :].mean(axis=-2)


def canonical_frame(shape: np.ndarray) -> np.ndarray:
    """The similarity that puts the eye centres at (-0.5, 0) and (0.5, 0), applied to ``shape`` (68, 2):
    unit inter-ocular distance, eye line horizontal."""
    z = shape[:, 0] + 1j * shape[:, 1]
    left, right = _eye_centres(shape)
    p1, p2 = complex(*left), complex(*right)
    a = 1.0 / (p2 - p1)  # maps p2 - p1 to 1
    w = a * (z - p1) - 0.5
    return np.stack([w.real, w.imag], axis=1)


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ s R src + t`` per shape (Umeyama 1991, no reflection).

    ``src`` (N, K, 2), ``dst`` (K, 2) -> scale (N,), rotation (N, 2, 2), translation (N, 2).
    """
    mu_x, mu_y = src.mean(axis=1), dst.mean(axis=0)
    xc, yc = src - mu_x[:, None], dst - mu_y
    cov = np.einsum("kd,nke->nde", yc, xc) / src.shape[1]  # (N, 2, 2) = Sigma_xy
    u, sv, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    fix = np.stack([np.ones_like(d), d], axis=1)  # diag(1, d) keeps R a rotation
    rot = u @ (fix[:, :, None] * vt)
    var_x = (xc**2).sum(axis=(1, 2)) / src.shape[1]
    scale = (sv * fix).sum(axis=1) / var_x
    trans = mu_y - scale[:, None] * np.einsum("nde,ne->nd", rot, mu_x)
    return scale, rot, trans


def procrustes_align(landmarks: np.ndarray, template: np.ndarray, anchors: np.ndarray = RIGID) -> np.ndarray:
    """Each (68, 2) shape mapped by the similarity that best fits its ``anchors`` to the template's."""
    lm = np.asarray(landmarks, np.float64)
    scale, rot, trans = similarity_fit(lm[:, anchors], np.asarray(template, np.float64)[anchors])
    return scale[:, None, None] * np.einsum("nde,nke->nkd", rot, lm) + trans[:, None]


def expression_template(landmarks: np.ndarray, iterations: int = 5) -> np.ndarray:
    """Generalised-Procrustes mean shape (68, 2) in the canonical frame of ``canonical_frame``.

    Starts from the first shape and alternates "align all to the mean" / "mean of the aligned".
    Applying any similarity to any input shape leaves the result unchanged.
    """
    lm = np.asarray(landmarks, np.float64)
    lm = lm[np.isfinite(lm).all(axis=(1, 2))]
    if len(lm) == 0:
        raise McdmError("landmark template: no frame has landmarks (no face found)")
    template = canonical_frame(lm[0])
    for _ in range(iterations):
        template = canonical_frame(procrustes_align(lm, template).mean(axis=0))
    return template


def landmark_expression_features(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """(N, 68, 2) landmarks -> (N, 84) pose-normalised expression offsets (mouth, brows, eyes) from
    the template, in inter-ocular-distance units."""
    aligned = procrustes_align(landmarks, template)
    return (aligned - template)[:, EXPRESSION].reshape(len(aligned), -1)


# ---------------------------------------------------------------------------------------------
# FVD fallback: appearance + motion features of 16-frame clips

SIGNALS = ("mouth_open", "mouth_width", "eye_open_l", "eye_open_r", "brow_raise",
           "head_x", "head_y", "head_scale", "head_roll")


def face_signals(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """(T, 68, 2) frame-pixel landmarks of one clip -> (T, 9) per-frame ``SIGNALS``, all in
    inter-ocular-distance (IOD) units or radians, so they do not depend on the frame size.

    Expression signals are measured on the Procrustes-aligned shape; head signals are the
    eye-centre position over the clip's median IOD, the log of IOD over its median (zoom) and the
    in-plane roll of the eye line.
    """
    a = procrustes_align(landmarks, template)
    y = a[..., 1]
    mouth_open = (y[:, [67, 66, 65]] - y[:, [61, 62, 63]]).mean(axis=1)
    mouth_width = a[:, 54, 0] - a[:, 48, 0]
    eye_open_l = (y[:, [41, 40]] - y[:, [37, 38]]).mean(axis=1)
    eye_open_r = (y[:, [47, 46]] - y[:, [43, 44]]).mean(axis=1)
    brow_raise = y[:, EYE_L.start:EYE_R.stop].mean(axis=1) - y[:, BROWS].mean(axis=1)
    left, right = _eye_centres(np.asarray(landmarks, np.float64))
    centre, span = (left + right) / 2, right - left
    iod = np.hypot(span[:, 0], span[:, 1])
    unit = float(np.median(iod))
    head = [centre[:, 0] / unit, centre[:, 1] / unit, np.log(iod / unit), np.arctan2(span[:, 1], span[:, 0])]
    return np.stack([mouth_open, mouth_width, eye_open_l, eye_open_r, brow_raise, *head], axis=1)


def clip_dynamics(frames: np.ndarray, signals: np.ndarray, descriptors: np.ndarray, fps: float) -> np.ndarray:
    """One clip's feature vector: [descriptor mean (128), descriptor std (128), amplitude spectra of
    the signals' velocities (T//2 bins x 9, units per second), signal means (9), amplitude spectrum
    of the frame-difference energy (T//2 bins, per second)]: 345 numbers for 16 frames."""
    d = descriptors[np.isfinite(descriptors).all(axis=1)]
    appearance = np.concatenate([d.mean(axis=0), d.std(axis=0)])
    steps = len(signals) - 1
    velocity = np.diff(signals, axis=0) * fps  # (T-1, 9) per second
    motion = np.abs(np.fft.rfft(velocity, axis=0)) / steps  # (T//2, 9)
    gray = frames.astype(np.float64).mean(axis=-1) / 255.0
    energy = np.abs(np.diff(gray, axis=0)).mean(axis=(1, 2)) * fps  # (T-1,) mean |f_{t+1} - f_t| per second
    energy_spectrum = np.abs(np.fft.rfft(energy)) / steps
    return np.concatenate([appearance, motion.ravel(), signals.mean(axis=0), energy_spectrum])


CLIP_DYNAMICS_PARTS = ("appearance", "motion", "mean_signals", "frame_change")


def clip_dynamics_parts(clip_frames: int) -> dict[str, slice]:
    """Where each of ``CLIP_DYNAMICS_PARTS`` lies in ``clip_dynamics``'s vector for ``clip_frames``-frame
    clips: appearance (descriptor mean and std), motion (velocity spectra), mean_signals, frame_change
    (spectrum of the frame-difference energy). The FVD fallback reports its Fréchet distance on each
    part beside the whole, so a value can be read as "looks wrong" or "moves wrong"."""
    bins = (clip_frames - 1) // 2 + 1  # rfft of the T - 1 frame-to-frame steps
    sizes = (2 * DESCRIPTOR_DIM, bins * len(SIGNALS), len(SIGNALS), bins)
    ends = np.cumsum(sizes)
    return {part: slice(int(end - size), int(end)) for part, size, end in zip(CLIP_DYNAMICS_PARTS, sizes, ends)}


class DynamicsVideoFeatures:
    """FVD fallback: ``clip_dynamics`` of every non-overlapping ``clip_frames`` clip.

    The face descriptor is taken on every ``descriptor_every``-th frame of a clip (the expensive
    part); landmarks on every frame, with frames lacking a face interpolated from their
    neighbours. A clip with fewer than ``min_face_fraction`` of its frames holding a face is
    dropped and counted.
    """

    label = "fvd-fallback:dlib-descriptor+landmark-dynamics"

    def __init__(self, faces: DlibFrameFeatures | None = None, descriptor_every: int = 4, min_face_fraction: float = 0.5,
                 fps: float = 25.0):
        self.faces = faces or DlibFrameFeatures()
        self.fps = fps
        self.descriptor_every = descriptor_every
        self.min_face_fraction = min_face_fraction

    def template(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """The expression template of a clip set (computed on the real set, shared with the fake)."""
        return expression_template(np.concatenate([self.faces.landmarks(c) for c in clips]))

    def __call__(self, clips: Sequence[np.ndarray], template: np.ndarray) -> tuple[np.ndarray, int]:
        """(clip features (M, D), number of clips dropped for lack of a face)."""
        feats, dropped = [], 0
        for clip in tqdm(clips, desc="fvd fallback", leave=False, disable=None if len(clips) > 4 else True):
            lm = self.faces.landmarks(clip)
            found = np.isfinite(lm).all(axis=(1, 2))
            desc = self.faces.descriptors(clip[:: self.descriptor_every])
            if found.mean() < self.min_face_fraction or not np.isfinite(desc).all(axis=1).any():
                dropped += 1
                continue
            signals = face_signals(fill_missing(lm), template)
            feats.append(clip_dynamics(clip, signals, desc, self.fps))
        return (np.stack(feats) if feats else np.empty((0, 0))), dropped
