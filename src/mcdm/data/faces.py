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
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter1d

from mcdm.config import Params
from mcdm.data.parallel import Crashed, map_videos
from mcdm.data.rejects import StageSummary, finish_stage, reject_row
from mcdm.data.scenes import FrameCache
from mcdm.face.dlib import DlibFace
from mcdm.face.tracks import (
    TrackSettings,
    crop_boxes,
    crop_square,
    face_runs,
    make_detector,
    sample_faces,
    to_crop_coords,
    track_boxes,
)
from mcdm.media.files import read_table, remove_partial
from mcdm.media.io import MediaError, iter_frames, read_audio, write_video

STAGE = "faces"
FACE_COLUMNS = ["clip_id", "video_id", "source_id", "file", "n_frames", "crop_path", "landmarks_path",
                "face_px", "detect_rate", "start", "end", "duration", "long_term", "language",
                "scene_clip_id", "scene_path", "scene_offset", "face_detector"]


# ------------------------------------------------------------------------------------------ clip
def _cached_frames(path: str, fps: float, cache: FrameCache) -> Iterator[np.ndarray]:
    """The clip's frames, kept in ``cache`` for the second pass when they fit."""
    for _, img in iter_frames(path, fps=fps):
        cache.add(img)
        yield img


def process_clip(clip: dict, params: Params, out_dir: str) -> dict:
    """One scene clip -> its face clips (kept rows) and rejects."""
    data = params.data
    file, cid = clip["file"], clip["clip_id"]
    fps, rate = data.fps, data.audio_rate
    detector = make_detector(data.face_detector, data.scrfd_path)
    settings = TrackSettings.from_data(data)
    rejects: list[dict] = []
    cache = FrameCache()
    try:
        samples, n, (height, width) = sample_faces(_cached_frames(clip["path"], fps, cache), settings, detector)
    except MediaError as err:
        return {"kept": [], "rejects": [reject_row(file, STAGE, "unreadable", str(err), cid)]}
    if not samples:
        return {"kept": [], "rejects": [reject_row(file, STAGE, "unreadable", "no frames decoded", cid)]}
    counts = Counter(s.status for s in samples)
    multi_rate = counts["multi"] / len(samples)
    if multi_rate >= data.max_multi_face_rate and counts["multi"] > 0:
        return {"kept": [], "rejects": [reject_row(file, STAGE, "multiple_faces",
                f"2+ faces in {multi_rate:.0%} of {len(samples)} sampled frames (max {data.max_multi_face_rate:.0%})", cid)]}
    runs, dropped = face_runs(samples, n, settings)
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
    boxes = track_boxes(run, a, b, TrackSettings.from_data(data))
    squares = crop_boxes(boxes, height, width, data.crop_scale)
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
    make_detector(params.data.face_detector, params.data.scrfd_path)  # a missing SCRFD file stops here, once
    clips = read_table(clips_path, "scenes")
    out_dir = Path(out_dir)
    for sub in ("crops", "landmarks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    items = clips.to_dict("records")
    results = map_videos(partial(process_clip, params=params, out_dir=str(out_dir)), items, workers,
                         params.data.dask_address, desc=STAGE, cost=lambda c: float(c["n_frames"]),
                         timeout=params.data.item_timeout_seconds)
    kept, rejects = [], []
    for clip, res in zip(items, results):
        if isinstance(res, Crashed):
            rejects.append(reject_row(clip["file"], STAGE, res.code, res.reason, clip["clip_id"]))
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
