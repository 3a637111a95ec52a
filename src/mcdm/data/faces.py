"""faces: find the one talking face of each clip, crop it square over time, keep 68 landmarks per frame.

Per scene clip (two streamed passes over the clip, at ``data.fps``):

1. Sample. The face detector (dlib's HOG by default; SCRFD from a local ONNX file with
   ``data.face_detector: scrfd``) runs on every ``data.face_sample_every``-th frame and the last one.
   dlib sees the frame scaled so a ``data.min_face_px`` face is ~80 px (HOG's window), at most
   ``data.detect_max_side`` px long. Each sample is ``one`` (exactly one face, inside the frame),
   ``none``, ``multi`` (2+ faces) or ``partial`` (the face box leaves the frame).
2. Runs. A clip with 2+ faces in ``data.max_multi_face_rate`` of its samples is rejected whole
   (``multiple_faces``). Otherwise consecutive ``one`` samples form runs; a stretch without exactly
   one face longer than ``data.max_face_gap_seconds``, or a face centre jumping more than
   ``data.max_face_jump`` x its size between samples (a cut the scene detector missed), SPLITS the
   clip there: the stretch is dropped (a reject row naming its frames and why: ``no_face``,
   ``multiple_faces``, ``partial_face``, ``face_jump``) and the runs on either side are kept as
   their own clips when long enough. We split rather than reject so a long clip with one
   look-away keeps its good seconds; shorter gaps are interpolated over. A run is rejected when
   shorter than ``data.min_clip_seconds`` (``too_short``), when fewer than
   ``data.min_face_frame_rate`` of its samples hold exactly one face (``unstable_face``), or when its
   median face is smaller than ``data.min_face_px`` (``small_face``).
3. Track. Face boxes (centre and side) are interpolated linearly between samples and smoothed with a
   Gaussian of ``data.box_smooth_seconds``. The crop is a square of constant side
   ``data.crop_scale`` x the run's median face side (the whole head and some shoulders, stable over
   time) around the smoothed centre, kept inside the frame where it fits (edge pixels repeat where
   it does not), resized to ``data.resolution``.
4. Crop + landmarks. The second pass (over frames kept from the first when the clip fits in 256 MB,
   else decoded again) runs dlib's 68-landmark predictor on EVERY frame inside the
   smoothed box, maps the points to crop pixels, smooths them over time with a Gaussian of
   ``data.landmark_smooth_frames`` frames, and writes the crop (with the clip's audio).

Outputs per kept clip: ``<out>/crops/<clip_id>.mp4`` and ``<out>/landmarks/<clip_id>.npz`` with
``landmarks`` (T,68,2 crop px), ``boxes`` (T,4 smoothed face box l,t,r,b in source px),
``crop_boxes`` (T,4 the square crop region in source px), ``detected`` (T bool: a real detection on
that frame). A clip kept whole keeps its scene clip id; the parts of a split clip are
``<clip_id>_f<k>``.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter1d

from mcdm.config import Params
from mcdm.face.dlib import DlibFace, Face
from mcdm.media.io import MediaError, iter_frames, read_audio, write_video
from mcdm.data.parallel import Crashed, map_videos
from mcdm.data.rejects import StageSummary, finish_stage, read_table, reject_row, remove_partial
from mcdm.data.scenes import FrameCache
from mcdm.errors import McdmError

STAGE = "faces"
HOG_FACE_PX = 80  # dlib's HOG window: the smallest face it finds reliably, in detector pixels
FACE_COLUMNS = ["clip_id", "video_id", "source_id", "file", "n_frames", "crop_path", "landmarks_path",
                "face_px", "detect_rate", "start", "end", "duration", "long_term", "language",
                "scene_clip_id", "scene_path", "scene_offset", "face_detector"]


# ------------------------------------------------------------------------------------ detectors
class ScrfdDetector:
    """SCRFD (InsightFace) from a local ONNX file, run with OpenCV's DNN module; same ``detect``
    interface as :class:`DlibFace` (boxes in image pixels, best first)."""

    input_size = 640

    def __init__(self, path: str | None, score_threshold: float = 0.5, nms_threshold: float = 0.4):
        if not path or not Path(path).is_file():
            raise McdmError(f"data.face_detector is 'scrfd' but data.scrfd_path {path!r} is not a file")
        self.path, self.score_threshold, self.nms_threshold = str(path), score_threshold, nms_threshold
        self._net = None

    def __getstate__(self):
        return {"path": self.path, "score_threshold": self.score_threshold,
                "nms_threshold": self.nms_threshold, "_net": None}

    def detect(self, rgb: np.ndarray, **_) -> list[Face]:
        if self._net is None:
            self._net = cv2.dnn.readNetFromONNX(self.path)
        h, w = rgb.shape[:2]
        s = self.input_size / max(h, w)
        canvas = np.zeros((self.input_size, self.input_size, 3), np.uint8)
        canvas[: round(h * s), : round(w * s)] = cv2.resize(rgb, (round(w * s), round(h * s)))
        blob = cv2.dnn.blobFromImage(canvas, 1.0 / 128, (self.input_size, self.input_size), (127.5,) * 3)
        self._net.setInput(blob)
        outs = self._net.forward(self._net.getUnconnectedOutLayersNames())
        boxes, scores = decode_scrfd(outs, self.input_size, self.score_threshold)
        keep = cv2.dnn.NMSBoxes([[*b[:2], *(b[2:] - b[:2])] for b in boxes.tolist()], scores.tolist(),
                                self.score_threshold, self.nms_threshold) if len(boxes) else []
        faces = [Face(tuple(int(round(v / s)) for v in boxes[i]), float(scores[i])) for i in np.ravel(keep)]
        return sorted(faces, key=lambda f: -f.score)


def decode_scrfd(outputs, input_size: int, score_threshold: float, strides=(8, 16, 32),
                 anchors_per_cell: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """SCRFD heads -> boxes (N,4 x1,y1,x2,y2) and scores, before NMS.

    Each stride s has a (input/s)^2 grid with ``anchors_per_cell`` anchors at the cell corner
    (x*s, y*s); a box is that point minus/plus the predicted distances x stride (distance2bbox).
    Heads are matched by shape (scores: last dim 1, boxes: 4; key points, 10, are not needed).
    """
    arrs = [np.asarray(o).reshape(-1, np.asarray(o).shape[-1]) for o in outputs]
    by_len: dict[int, dict[int, np.ndarray]] = {}
    for a in arrs:
        by_len.setdefault(len(a), {})[a.shape[1]] = a
    all_boxes, all_scores = [], []
    for s in strides:
        g = input_size // s
        n = g * g * anchors_per_cell
        heads = by_len.get(n, {})
        if 1 not in heads or 4 not in heads:
            raise MediaError(f"SCRFD model outputs do not match stride {s} ({n} anchors)")
        ys, xs = np.mgrid[:g, :g]
        centers = np.repeat(np.stack([xs.ravel(), ys.ravel()], 1) * s, anchors_per_cell, axis=0).astype(np.float32)
        score = heads[1][:, 0]
        d = heads[4] * s
        keep = score >= score_threshold
        c, d = centers[keep], d[keep]
        all_boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
        all_scores.append(score[keep])
    return np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_scores).astype(np.float32)


def make_detector(params: Params):
    if params.data.face_detector == "scrfd":
        return ScrfdDetector(params.data.scrfd_path)
    return DlibFace()


def detection_scale(height: int, width: int, params: Params) -> float:
    """dlib only: the scale at which a ``min_face_px`` face fills HOG's window, capped in size."""
    return min(HOG_FACE_PX / params.data.min_face_px, params.data.detect_max_side / max(height, width))


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


def sample_faces(path: str, params: Params, detector, cache: FrameCache | None = None) -> tuple[list[Sample], int, tuple[int, int]]:
    """Detect on every k-th frame and the last one: samples, frame count, (height, width)."""
    k = params.data.face_sample_every
    samples: list[Sample] = []
    last = None
    n, hw = 0, (0, 0)
    scale = None

    def run(idx: int, img: np.ndarray) -> Sample:
        nonlocal scale
        h, w = img.shape[:2]
        if isinstance(detector, DlibFace):
            if scale is None:
                scale = detection_scale(h, w, params)
            small = cv2.resize(img, (round(w * scale), round(h * scale)),
                               interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            faces = [Face(tuple(v / scale for v in f.box), f.score) for f in detector.detect(small)]
        else:
            faces = detector.detect(img)
        smp = classify(faces, h, w)
        smp.frame = idx
        return smp

    for n, (_, img) in enumerate(iter_frames(path, fps=params.data.fps), start=1):
        if cache is not None:
            cache.add(img)
        hw = img.shape[:2]
        if (n - 1) % k == 0:
            samples.append(run(n - 1, img))
            last = None
        else:
            last = (n - 1, img)
    if last is not None:
        samples.append(run(*last))
    return samples, n, hw


def face_runs(samples: list[Sample], n_frames: int, params: Params) -> tuple[list[list[Sample]], list[tuple[int, int, str]]]:
    """Split the samples into runs of a steady single face; the dropped frame ranges with a reason.

    Runs are lists of samples (bad samples inside tolerated gaps included); dropped ranges are
    ``(first_frame, end_frame, code)``.
    """
    data = params.data
    max_gap = data.max_face_gap_seconds * data.fps
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
            if gap > max_gap or jump > data.max_face_jump:
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
def track_boxes(run: list[Sample], a: int, b: int, params: Params) -> np.ndarray:
    """Smoothed face boxes (T,4) for frames ``a..b-1`` from the run's good samples."""
    good = [s for s in run if s.status == "one"]
    f = np.array([s.frame for s in good], np.float64)
    boxes = np.stack([s.box for s in good]).astype(np.float64)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    t = np.arange(a, b, dtype=np.float64)
    series = np.stack([np.interp(t, f, v) for v in (cx, cy, w, h)], 1)  # (T, 4)
    sigma = params.data.box_smooth_seconds * params.data.fps
    if sigma > 0 and len(t) > 1:
        series = gaussian_filter1d(series, sigma, axis=0, mode="nearest")
    cx, cy, w, h = series.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)


def crop_boxes(face_boxes: np.ndarray, height: int, width: int, params: Params) -> np.ndarray:
    """Square crop regions (T,4, integer l,t,r,b): constant side, kept in the frame where it fits."""
    side_face = float(np.median(np.minimum(face_boxes[:, 2] - face_boxes[:, 0], face_boxes[:, 3] - face_boxes[:, 1])))
    side = max(2, int(round(params.data.crop_scale * side_face)))
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


# ------------------------------------------------------------------------------------------ clip
def process_clip(clip: dict, params: Params, out_dir: str) -> dict:
    """One scene clip -> its face clips (kept rows) and rejects."""
    data = params.data
    file, cid = clip["file"], clip["clip_id"]
    fps, rate = data.fps, data.audio_rate
    detector = make_detector(params)
    rejects: list[dict] = []
    cache = FrameCache()
    try:
        samples, n, (height, width) = sample_faces(clip["path"], params, detector, cache)
    except MediaError as err:
        return {"kept": [], "rejects": [reject_row(file, STAGE, "unreadable", str(err), cid)]}
    if not samples:
        return {"kept": [], "rejects": [reject_row(file, STAGE, "unreadable", "no frames decoded", cid)]}
    counts = Counter(s.status for s in samples)
    multi_rate = counts["multi"] / len(samples)
    if multi_rate >= data.max_multi_face_rate and counts["multi"] > 0:
        return {"kept": [], "rejects": [reject_row(file, STAGE, "multiple_faces",
                f"2+ faces in {multi_rate:.0%} of {len(samples)} sampled frames (max {data.max_multi_face_rate:.0%})", cid)]}
    runs, dropped = face_runs(samples, n, params)
    if not runs:
        code = {"none": "no_face", "multi": "multiple_faces", "partial": "partial_face"}[max(
            ("none", "multi", "partial"), key=lambda s: counts[s])]
        detail = ", ".join(f"{k} {counts[k]}" for k in ("none", "multi", "partial") if counts[k])
        return {"kept": [], "rejects": [reject_row(file, STAGE, code, f"no sampled frame with exactly one face ({detail} of {len(samples)})", cid)]}
    for a, b, code in dropped:
        if b > a:
            rejects.append(reject_row(file, STAGE, code, f"frames {a}-{b} ({a / fps:.2f}-{b / fps:.2f} s) dropped, clip split", cid))
    audio = None
    kept = []
    whole = len(runs) == 1 and runs[0][0].frame == 0 and runs[0][-1].frame == n - 1
    for j, run in enumerate(runs):
        a, b = run[0].frame, run[-1].frame + 1
        out_id = cid if whole else f"{cid}_f{j}"
        span = f"frames {a}-{b} ({a / fps:.2f}-{b / fps:.2f} s)"
        good = [s for s in run if s.status == "one"]
        rate_one = len(good) / len(run)
        face_px = float(np.median([min(s.box[2] - s.box[0], s.box[3] - s.box[1]) for s in good]))
        if (b - a) < data.min_clip_seconds * fps - 1e-6:
            rejects.append(reject_row(file, STAGE, "too_short", f"face run {(b - a) / fps:.2f} s < data.min_clip_seconds {data.min_clip_seconds} s, {span}", cid))
            continue
        if rate_one < data.min_face_frame_rate:
            rejects.append(reject_row(file, STAGE, "unstable_face", f"one face in {rate_one:.0%} of samples < data.min_face_frame_rate {data.min_face_frame_rate:.0%}, {span}", cid))
            continue
        if face_px < data.min_face_px:
            rejects.append(reject_row(file, STAGE, "small_face", f"median face {face_px:.0f} px < data.min_face_px {data.min_face_px}, {span}", cid))
            continue
        if audio is None:
            try:
                audio = read_audio(clip["path"], rate=rate)
            except MediaError as err:
                rejects.append(reject_row(file, STAGE, "no_audio", str(err), cid))
                break
        try:
            row = _write_face_clip(clip, run, a, b, out_id, height, width, audio, params, Path(out_dir), cache)
        except MediaError as err:
            rejects.append(reject_row(file, STAGE, "unreadable", f"{err}, {span}", out_id))
            continue
        row.update(face_px=face_px, detect_rate=rate_one)
        kept.append(row)
    return {"kept": kept, "rejects": rejects}


def _write_face_clip(clip, run, a, b, out_id, height, width, audio, params: Params, out_dir: Path,
                     cache: FrameCache) -> dict:
    data = params.data
    fps, res, rate = data.fps, data.resolution, data.audio_rate
    boxes = track_boxes(run, a, b, params)
    squares = crop_boxes(boxes, height, width, params)
    detected = np.zeros(b - a, bool)
    detected[[s.frame - a for s in run if s.status == "one"]] = True
    marks = np.zeros((b - a, 68, 2), np.float32)
    lm = DlibFace()
    count = [0]

    def crops():
        for i, (_, img) in enumerate(cache.span(clip["path"], fps, a, b)):
            if i >= b - a:
                return
            marks[i] = to_crop_coords(lm.landmarks(img, tuple(boxes[i])), squares[i], res)
            count[0] = i + 1
            yield crop_square(img, squares[i], res)

    crop_path = out_dir / "crops" / f"{out_id}.mp4"
    spf = rate / fps
    seg = audio[int(round(a * spf)) : int(round(b * spf))]
    try:
        write_video(crop_path, crops(), fps=fps, audio=seg, audio_rate=rate)
    except (MediaError, ValueError) as err:
        remove_partial(crop_path)
        raise MediaError(str(err)) from err
    t = count[0]
    if t < b - a - 1:
        remove_partial(crop_path)
        raise MediaError(f"decoded {t} of {b - a} frames")
    marks, boxes, squares, detected = marks[:t], boxes[:t], squares[:t], detected[:t]
    if data.landmark_smooth_frames > 0 and t > 1:
        marks = gaussian_filter1d(marks, data.landmark_smooth_frames, axis=0, mode="nearest").astype(np.float32)
    lm_path = out_dir / "landmarks" / f"{out_id}.npz"
    lm_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = lm_path.with_name(f".{out_id}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, landmarks=marks, boxes=boxes, crop_boxes=squares, detected=detected)
    os.replace(tmp, lm_path)
    start = float(clip["start"]) + a / fps
    return {
        "clip_id": out_id, "video_id": clip["video_id"], "source_id": clip["source_id"], "file": clip["file"],
        "n_frames": t, "crop_path": str(crop_path), "landmarks_path": str(lm_path),
        "start": start, "end": start + t / fps, "duration": t / fps,
        "long_term": bool(clip.get("long_term", False)), "language": clip.get("language"),
        "scene_clip_id": clip["clip_id"], "scene_path": clip["path"], "scene_offset": a,
        "face_detector": params.data.face_detector,
    }


# ----------------------------------------------------------------------------------------- stage
def faces(clips_path: str | os.PathLike, out_dir: str | os.PathLike, params: Params,
          workers: int | None = None) -> tuple[pd.DataFrame, StageSummary]:
    """Face-crop every scene clip; write ``faces.parquet``, ``crops/``, ``landmarks/`` + rejects."""
    started = time.perf_counter()
    workers = workers or params.data.workers
    make_detector(params)  # a missing SCRFD file stops here, once, with one line
    clips = read_table(clips_path, "scenes")
    out_dir = Path(out_dir)
    for sub in ("crops", "landmarks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    items = clips.to_dict("records")
    results = map_videos(partial(process_clip, params=params, out_dir=str(out_dir)), items, workers,
                         params.data.dask_address, desc=STAGE, cost=lambda c: float(c["n_frames"]))
    kept, rejects = [], []
    for clip, res in zip(items, results):
        if isinstance(res, Crashed):
            rejects.append(reject_row(clip["file"], STAGE, "crashed", res.reason, clip["clip_id"]))
            continue
        kept += res["kept"]
        rejects += res["rejects"]
    table = pd.DataFrame(kept, columns=FACE_COLUMNS)
    keep_ids = set(table["clip_id"])
    for sub, ext in (("crops", "mp4"), ("landmarks", "npz")):
        for p in (out_dir / sub).glob(f"*.{ext}"):
            if p.stem not in keep_ids:
                p.unlink()
    summary = finish_stage(STAGE, out_dir, "faces", table, rejects, started,
                           video_seconds=float(clips["n_frames"].sum()) / params.data.fps, workers=workers,
                           extra={"face_detector": params.data.face_detector,
                                  "face_seconds": float(table["duration"].sum())})
    return table, summary
