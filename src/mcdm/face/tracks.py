"""Face tracks: find the one talking face over a stream of frames, interpolate and smooth its box,
and cut the square talking-head crop around it (the faces stage on training clips; generation on a
portrait and a driving video).

1. Sample: the detector runs on every ``face_sample_every``-th frame (dlib sees the frame scaled so a
   ``min_face_px`` face is ~80 px, HOG's window); each sample is ``one``, ``none``, ``multi`` or
   ``partial`` (the face box leaves the frame).
2. Runs: consecutive ``one`` samples; a longer gap than ``max_face_gap_seconds`` or a jump of the face
   centre by more than ``max_face_jump`` x its size splits the track there.
3. Track: boxes interpolated between samples and smoothed with a Gaussian of ``box_smooth_seconds``;
   the crop is a square of ``crop_scale`` x the median face side, kept inside the frame where it fits.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from typing import Iterable

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from mcdm.face.dlib import DlibFace, Face
from mcdm.face.scrfd import ScrfdDetector

HOG_FACE_PX = 80  # dlib's HOG window: the smallest face it finds reliably, in detector pixels


@dataclass(frozen=True)
class TrackSettings:
    """How faces are sampled, tracked and cropped: the ``data`` params of the same names (the faces
    stage crops training clips with them; generation crops the portrait and a driving video with
    the ones the model was trained with)."""

    fps: float
    face_sample_every: int  # detect on every k-th frame (and the last one)
    min_face_px: int  # smallest face side worth keeping, source pixels
    detect_max_side: int  # dlib sees frames at most this long
    max_face_gap_seconds: float  # a longer stretch without exactly one face splits the track
    max_face_jump: float  # a face centre jumping more than this x its size between samples splits it
    box_smooth_seconds: float  # Gaussian smoothing of the interpolated boxes
    crop_scale: float  # crop side = crop_scale x the track's median face side
    resolution: int  # crop side in output pixels

    @classmethod
    def from_data(cls, data) -> "TrackSettings":
        """From the ``data`` section of the params (any object with these attributes)."""
        return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})


def make_detector(kind: str = "dlib", scrfd_path: str | None = None):
    """dlib's HOG detector, or SCRFD from the ONNX file at ``scrfd_path`` (``data.face_detector``)."""
    if kind == "scrfd":
        return ScrfdDetector(scrfd_path)
    return DlibFace()


def detection_scale(height: int, width: int, settings: TrackSettings) -> float:
    """dlib only: the scale at which a ``min_face_px`` face fills HOG's window, capped in size."""
    return min(HOG_FACE_PX / settings.min_face_px, settings.detect_max_side / max(height, width))


# -------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    frame: int
    status: str  # one | none | multi | partial
    box: np.ndarray | None  # (4,) l, t, r, b in source pixels (the best face)
    n_faces: int


def classify(faces: list[Face], height: int, width: int, tol: float = 0.05) -> Sample:
    if not faces:
        return Sample(-1, "none", None, 0)
    best = np.asarray(faces[0].box, np.float32)
    if len(faces) >= 2:
        return Sample(-1, "multi", best, len(faces))
    m = tol * (best[2] - best[0])
    inside = best[0] >= -m and best[1] >= -m and best[2] <= width + m and best[3] <= height + m
    return Sample(-1, "one" if inside else "partial", best, 1)


def sample_faces(frames: Iterable[np.ndarray], settings: TrackSettings, detector) -> tuple[list[Sample], int, tuple[int, int]]:
    """Detect on every k-th frame of ``frames`` (RGB at ``settings.fps``) and on the last one:
    samples, frame count, (height, width)."""
    k = settings.face_sample_every
    samples: list[Sample] = []
    last = None
    n, hw = 0, (0, 0)
    scale = None

    def run(idx: int, img: np.ndarray) -> Sample:
        nonlocal scale
        h, w = img.shape[:2]
        if isinstance(detector, DlibFace):
            if scale is None:
                scale = detection_scale(h, w, settings)
            small = cv2.resize(img, (round(w * scale), round(h * scale)),
                               interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            faces = [Face(tuple(v / scale for v in f.box), f.score) for f in detector.detect(small)]
        else:
            faces = detector.detect(img)
        smp = classify(faces, h, w)
        smp.frame = idx
        return smp

    for n, img in enumerate(frames, start=1):
        hw = img.shape[:2]
        if (n - 1) % k == 0:
            samples.append(run(n - 1, img))
            last = None
        else:
            last = (n - 1, img)
    if last is not None:
        samples.append(run(*last))
    return samples, n, hw


def face_runs(samples: list[Sample], n_frames: int, settings: TrackSettings) -> tuple[list[list[Sample]], list[tuple[int, int, str]]]:
    """Split the samples into runs of a steady single face; the dropped frame ranges with a reason.

    Runs are lists of samples (bad samples inside tolerated gaps included); dropped ranges are
    ``(first_frame, end_frame, code)``.
    """
    max_gap = settings.max_face_gap_seconds * settings.fps
    runs: list[list[Sample]] = []
    dropped: list[tuple[int, int, str]] = []
    current: list[Sample] = []
    pending_bad: list[Sample] = []
    last_good: Sample | None = None

    def majority(bad: list[Sample]) -> str:
        code = Counter(s.status for s in bad).most_common(1)[0][0] if bad else "face_jump"
        return {"none": "no_face", "multi": "multiple_faces", "partial": "partial_face"}.get(code, code)

    for smp in samples:
        if smp.status != "one":
            pending_bad.append(smp)
            continue
        if last_good is None:
            if pending_bad:
                dropped.append((0, smp.frame, majority(pending_bad)))
            current = [smp]
        else:
            gap = smp.frame - last_good.frame - 1 if pending_bad else 0
            side = 0.5 * ((last_good.box[2] - last_good.box[0]) + (smp.box[2] - smp.box[0]))
            jump = np.hypot(*(_center(smp.box) - _center(last_good.box))) / max(side, 1.0)
            if gap > max_gap or jump > settings.max_face_jump:
                runs.append(current)
                code = majority(pending_bad) if gap > max_gap else "face_jump"
                dropped.append((last_good.frame + 1, smp.frame, code))
                current = [smp]
            else:
                current += pending_bad + [smp]
        pending_bad = []
        last_good = smp
    if current:
        runs.append(current)
    if pending_bad:
        start = last_good.frame + 1 if last_good is not None else 0
        dropped.append((start, n_frames, majority(pending_bad)))
    return runs, dropped


def _center(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], np.float32)


# ----------------------------------------------------------------------------------------- track
def track_boxes(run: list[Sample], a: int, b: int, settings: TrackSettings) -> np.ndarray:
    """Smoothed face boxes (T,4) for frames ``a..b-1`` from the run's good samples."""
    good = [s for s in run if s.status == "one"]
    f = np.array([s.frame for s in good], np.float64)
    boxes = np.stack([s.box for s in good]).astype(np.float64)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    t = np.arange(a, b, dtype=np.float64)
    series = np.stack([np.interp(t, f, v) for v in (cx, cy, w, h)], 1)  # (T, 4)
    sigma = settings.box_smooth_seconds * settings.fps
    if sigma > 0 and len(t) > 1:
        series = gaussian_filter1d(series, sigma, axis=0, mode="nearest")
    cx, cy, w, h = series.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)


def crop_boxes(face_boxes: np.ndarray, height: int, width: int, crop_scale: float) -> np.ndarray:
    """Square crop regions (T,4, integer l,t,r,b): constant side, kept in the frame where it fits."""
    side_face = float(np.median(np.minimum(face_boxes[:, 2] - face_boxes[:, 0], face_boxes[:, 3] - face_boxes[:, 1])))
    side = max(2, int(round(crop_scale * side_face)))
    cx = (face_boxes[:, 0] + face_boxes[:, 2]) / 2
    cy = (face_boxes[:, 1] + face_boxes[:, 3]) / 2
    x0, y0 = np.round(cx - side / 2), np.round(cy - side / 2)
    if side <= width:
        x0 = np.clip(x0, 0, width - side)
    if side <= height:
        y0 = np.clip(y0, 0, height - side)
    return np.stack([x0, y0, x0 + side, y0 + side], 1).astype(np.float32)


def crop_square(img: np.ndarray, box: np.ndarray, out_side: int) -> np.ndarray:
    """``img[t:b, l:r]`` with edge pixels repeated outside the frame, resized to ``out_side``."""
    h, w = img.shape[:2]
    l, t, r, b = (int(v) for v in box)
    pad = max(0, -l, -t, r - w, b - h)
    if pad:
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        l, t, r, b = l + pad, t + pad, r + pad, b + pad
    patch = img[t:b, l:r]
    interp = cv2.INTER_AREA if patch.shape[0] > out_side else cv2.INTER_LINEAR
    return cv2.resize(patch, (out_side, out_side), interpolation=interp)


def to_crop_coords(points: np.ndarray, box: np.ndarray, out_side: int) -> np.ndarray:
    """Source-pixel points (...,2) -> crop pixels: ``(p - (l, t)) * out_side / side``."""
    return ((points - box[:2]) * (out_side / (box[2] - box[0]))).astype(np.float32)
