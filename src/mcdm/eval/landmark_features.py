"""The landmark fallbacks of the expression and video metrics (no downloaded weights: dlib's shipped,
pretrained face models give the landmarks and descriptors):

- ``landmark-expression-offsets`` (E-FID): each frame's 68 landmarks Procrustes-aligned (rotation,
  scale, translation, fitted on the rigid nose + eye points) to ITS IDENTITY'S NEUTRAL SHAPE (the
  reference portrait the clip is generated from, in the canonical frame of ``canonical_frame``), minus
  that neutral shape, on the mouth, brow and eye points: 84 numbers per frame in inter-ocular-distance
  units. Offsets from a shared template would carry each person's face shape (the same closed mouth on
  two people scored half the open-vs-closed effect); offsets from one's own neutral carry expression only.
- ``fvd-fallback:dlib-descriptor+landmark-dynamics`` (FVD): per clip, appearance (mean and std over the
  clip of the face descriptor), motion (amplitude spectra of the frame-to-frame velocities of mouth /
  eye / brow / head-pose signals from the landmarks), the clip's mean of those signals, the spectrum
  of the frame-difference energy, and time order (statistics that change sign when the clip is played
  backwards: the velocities' skewness and the lead-lag asymmetry between the mouth and the other
  signals; every amplitude spectrum is blind to the direction of time). Each clip's landmarks are
  aligned to the clip's own Procrustes mean shape, so a clip's features depend on that clip alone and
  the distance is symmetric in its two sets.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm import tqdm

from mcdm.errors import McdmError
from mcdm.eval.face_features import DESCRIPTOR_DIM, DlibFrameFeatures
from mcdm.face.dlib import BROWS, EYE_L, EYE_R, MOUTH, NOSE

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
    """The similarity that puts the eye centres at (-0.5, 0) and (0.5, 0), applied to ``shape`` (68, 2)
    or to each of (N, 68, 2): unit inter-ocular distance, eye line horizontal."""
    shape = np.asarray(shape, np.float64)
    z = shape[..., 0] + 1j * shape[..., 1]  # (..., 68)
    left, right = _eye_centres(shape)
    p1, p2 = left[..., 0] + 1j * left[..., 1], right[..., 0] + 1j * right[..., 1]
    a = 1.0 / (p2 - p1)  # maps p2 - p1 to 1
    w = a[..., None] * (z - p1[..., None]) - 0.5
    return np.stack([w.real, w.imag], axis=-1)


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ s R src + t`` per shape (Umeyama 1991, no reflection).

    ``src`` (N, K, 2), ``dst`` (K, 2) or (N, K, 2) -> scale (N,), rotation (N, 2, 2), translation (N, 2).
    """
    dst = np.broadcast_to(dst, src.shape)
    mu_x, mu_y = src.mean(axis=1), dst.mean(axis=1)
    xc, yc = src - mu_x[:, None], dst - mu_y[:, None]
    cov = np.einsum("nkd,nke->nde", yc, xc) / src.shape[1]  # (N, 2, 2) = Sigma_xy
    u, sv, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    fix = np.stack([np.ones_like(d), d], axis=1)  # diag(1, d) keeps R a rotation
    rot = u @ (fix[:, :, None] * vt)
    var_x = (xc**2).sum(axis=(1, 2)) / src.shape[1]
    scale = (sv * fix).sum(axis=1) / var_x
    trans = mu_y - scale[:, None] * np.einsum("nde,ne->nd", rot, mu_x)
    return scale, rot, trans


def procrustes_align(landmarks: np.ndarray, template: np.ndarray, anchors: np.ndarray = RIGID) -> np.ndarray:
    """Each (68, 2) shape mapped by the similarity that best fits its ``anchors`` to the template's
    (one template (68, 2) for all, or one per shape (N, 68, 2))."""
    lm = np.asarray(landmarks, np.float64)
    scale, rot, trans = similarity_fit(lm[:, anchors], np.asarray(template, np.float64)[..., anchors, :])
    return scale[:, None, None] * np.einsum("nde,nke->nkd", rot, lm) + trans[:, None]


def expression_template(landmarks: np.ndarray, iterations: int = 5) -> np.ndarray:
    """Generalised-Procrustes mean shape (68, 2) in the canonical frame of ``canonical_frame``.

    Starts from the mean of the shapes each put in the canonical frame and alternates "align all to
    the mean" / "mean of the aligned". Applying any similarity to any input shape, or reordering the
    shapes, leaves the result unchanged (a clip played backwards gets the same template).
    """
    lm = np.asarray(landmarks, np.float64)
    lm = lm[np.isfinite(lm).all(axis=(1, 2))]
    if len(lm) == 0:
        raise McdmError("landmark template: no frame has landmarks (no face found)")
    template = canonical_frame(canonical_frame(lm).mean(axis=0))
    for _ in range(iterations):
        template = canonical_frame(procrustes_align(lm, template).mean(axis=0))
    return template


def landmark_expression_features(landmarks: np.ndarray, neutral: np.ndarray) -> np.ndarray:
    """(N, 68, 2) landmarks -> (N, 84) pose-normalised expression offsets (mouth, brows, eyes) from the
    identity's neutral shape, in inter-ocular-distance units.

    ``neutral``: (68, 2) for all frames or (N, 68, 2), one per frame (its identity's reference
    landmarks), in any pose: it is first put in the canonical frame c = ``canonical_frame(neutral)``;
    each frame is aligned to c on the rigid points, and the offsets are ``aligned - c``. The same
    expression on two people therefore gives the same offsets, whatever their face shapes."""
    canonical = canonical_frame(neutral)
    aligned = procrustes_align(landmarks, canonical)
    return (aligned - canonical)[:, EXPRESSION].reshape(len(aligned), -1)


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


def time_order(velocity: np.ndarray) -> np.ndarray:
    """Statistics of a clip's (T-1, S) signal velocities that flip sign when the clip plays backwards,
    in the velocities' own units (per second, like the motion spectra).

    Played backwards, v'_t = -v_{T-2-t}. With c = v - mean(v) per signal (all 0 for a still signal):

    * asymmetry per signal, E[c^3] / E[c^2] (S numbers; the skewness times the spread): a mouth that
      opens fast and closes slowly has skewed velocities, reversed the opposite skew;
    * lead-lag of the mouth opening m (signal 0) with each other signal s,
      (E_t[c_m,t c_s,t+1] - E_t[c_m,t+1 c_s,t]) / sd(c_m) (S - 1 numbers): who moves first.
    """
    c = velocity - velocity.mean(axis=0)
    second = (c**2).mean(axis=0)
    asymmetry = np.where(second > 1e-24, (c**3).mean(axis=0) / np.where(second > 1e-24, second, 1.0), 0.0)
    m, others = c[:, 0], c[:, 1:]
    sd_m = float(np.sqrt(second[0]))
    if len(c) < 2 or sd_m <= 1e-12:
        return np.concatenate([asymmetry, np.zeros(others.shape[1])])
    lead_lag = ((m[:-1, None] * others[1:]).mean(axis=0) - (m[1:, None] * others[:-1]).mean(axis=0)) / sd_m
    return np.concatenate([asymmetry, lead_lag])


def clip_dynamics(frames: np.ndarray, signals: np.ndarray, descriptors: np.ndarray, fps: float) -> np.ndarray:
    """One clip's feature vector: [descriptor mean (128), descriptor std (128), amplitude spectra of
    the signals' velocities (T//2 bins x 9, units per second), signal means (9), amplitude spectrum
    of the frame-difference energy (T//2 bins, per second), time order (9 + 8, ``time_order``)]:
    362 numbers for 16 frames."""
    d = descriptors[np.isfinite(descriptors).all(axis=1)]
    appearance = np.concatenate([d.mean(axis=0), d.std(axis=0)])
    steps = len(signals) - 1
    velocity = np.diff(signals, axis=0) * fps  # (T-1, 9) per second
    motion = np.abs(np.fft.rfft(velocity, axis=0)) / steps  # (T//2, 9)
    gray = frames.astype(np.float64).mean(axis=-1) / 255.0
    energy = np.abs(np.diff(gray, axis=0)).mean(axis=(1, 2)) * fps  # (T-1,) mean |f_{t+1} - f_t| per second
    energy_spectrum = np.abs(np.fft.rfft(energy)) / steps
    return np.concatenate([appearance, motion.ravel(), signals.mean(axis=0), energy_spectrum, time_order(velocity)])


CLIP_DYNAMICS_PARTS = ("appearance", "motion", "mean_signals", "frame_change", "time_order")


def clip_dynamics_parts(clip_frames: int) -> dict[str, slice]:
    """Where each of ``CLIP_DYNAMICS_PARTS`` lies in ``clip_dynamics``'s vector for ``clip_frames``-frame
    clips: appearance (descriptor mean and std), motion (velocity spectra), mean_signals, frame_change
    (spectrum of the frame-difference energy), time_order (``time_order``). The FVD fallback reports its
    Fréchet distance on each part beside the whole, so a value can be read as "looks wrong", "moves
    wrong" or "runs the wrong way"."""
    bins = (clip_frames - 1) // 2 + 1  # rfft of the T - 1 frame-to-frame steps
    sizes = (2 * DESCRIPTOR_DIM, bins * len(SIGNALS), len(SIGNALS), bins, 2 * len(SIGNALS) - 1)
    ends = np.cumsum(sizes)
    return {part: slice(int(end - size), int(end)) for part, size, end in zip(CLIP_DYNAMICS_PARTS, sizes, ends)}


class DynamicsVideoFeatures:
    """FVD fallback: ``clip_dynamics`` of every non-overlapping ``clip_frames`` clip.

    The face descriptor is taken on every ``descriptor_every``-th frame of a clip (the expensive
    part); landmarks on every frame, with frames lacking a face interpolated from their
    neighbours, aligned to the clip's own Procrustes mean shape. A clip with fewer than
    ``min_face_fraction`` of its frames holding a face (or no descriptor) has no features: a NaN
    row, which the metric charges as a failure (``mcdm.eval.failures``).
    """

    label = "fvd-fallback:dlib-descriptor+landmark-dynamics"

    def __init__(self, faces: DlibFrameFeatures | None = None, descriptor_every: int = 4, min_face_fraction: float = 0.5,
                 fps: float = 25.0):
        self.faces = faces or DlibFrameFeatures()
        self.fps = fps
        self.descriptor_every = descriptor_every
        self.min_face_fraction = min_face_fraction

    def clip_features(self, clip: np.ndarray) -> np.ndarray | None:
        """``clip_dynamics`` of one clip, or None without enough face."""
        lm = self.faces.landmarks(clip)
        found = np.isfinite(lm).all(axis=(1, 2))
        desc = self.faces.descriptors(clip[:: self.descriptor_every])
        if found.mean() < self.min_face_fraction or not np.isfinite(desc).all(axis=1).any():
            return None
        filled = fill_missing(lm)
        signals = face_signals(filled, expression_template(filled))
        return clip_dynamics(clip, signals, desc, self.fps)

    def __call__(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """(M, D) clip features, a NaN row for each clip without enough face."""
        if not clips:
            return np.empty((0, 0))
        dim = clip_dynamics_parts(len(clips[0]))["time_order"].stop
        feats = np.full((len(clips), dim), np.nan)
        for i, clip in enumerate(tqdm(clips, desc="fvd fallback", leave=False, disable=None if len(clips) > 4 else True)):
            row = self.clip_features(clip)
            if row is not None:
                feats[i] = row
        return feats
