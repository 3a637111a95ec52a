"""scenes: cut every video at its scene changes into normalised clips of at most 30 s.

Per video (two streamed passes, never the whole video in memory):

1. Detect: frames resampled to ``data.fps`` and shrunk to <= 256 px go through PySceneDetect's
   ``AdaptiveDetector`` (``data.scene_detector: adaptive``; ``adaptive_threshold =
   data.scene_threshold``) or ``ContentDetector`` (``content``; ``threshold = data.scene_threshold``).
   A cut is the first frame of the new scene, in frames at ``data.fps``.
2. Segment: scenes lose ``data.cut_margin_frames`` frames on each side of a cut (a detector off by a
   frame then never leaks the other scene into a clip); a scene longer than ``data.max_clip_seconds``
   is split into the fewest equal pieces that fit; pieces shorter than ``data.min_clip_seconds`` are
   rejected (``too_short``), as are pieces whose audio is silent (``silent_audio``).
3. Write each piece as ``<out>/clips/<clip_id>.mp4``: constant ``data.fps``, 16 kHz mono AAC,
   original resolution (H.264 needs even sides: an odd last row / column is dropped).

Long-term videos (manifest ``long_term``) are clean test videos for the long-term curve: kept whole
as one clip, without detection or trimming (decisions.md #11).

Outputs: ``clips.parquet`` (``clip_id, video_id, source_id, file, start, end, n_frames, path`` +
``long_term, language, duration, width, height``) and ``cuts.parquet`` (``video_id, file, frame,
time``: every detected cut, for scoring against planted cuts).
"""
from __future__ import annotations

import math
import os
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mcdm.config import Params
from mcdm.data.parallel import Crashed, map_videos
from mcdm.data.rejects import StageSummary, finish_stage, reject_row
from mcdm.media.files import read_table, remove_partial, write_parquet
from mcdm.media.io import MediaError, iter_frames, read_audio, write_video

STAGE = "scenes"
DETECT_SIDE = 256  # PySceneDetect's own default downscale target
CACHE_BYTES = 256 << 20  # frames of one video held between the two passes (else decoded twice)
CLIP_COLUMNS = ["clip_id", "video_id", "source_id", "file", "start", "end", "n_frames", "path",
                "long_term", "language", "duration", "width", "height"]
CUT_COLUMNS = ["video_id", "file", "frame", "time"]


class FrameCache:
    """Decoded frames kept while they fit in ``limit`` bytes, so a second pass over a short clip
    needs no second decode; past the limit it falls back to streaming from the file."""

    def __init__(self, limit: int = CACHE_BYTES):
        self.frames: list[np.ndarray] | None = [] if limit > 0 else None
        self.size, self.limit = 0, limit

    def add(self, img: np.ndarray) -> None:
        if self.frames is None:
            return
        self.size += img.nbytes
        if self.size > self.limit:
            self.frames = None  # too long to hold: stream again
        else:
            self.frames.append(img)

    def span(self, path: str, fps: float, a: int, b: int):
        """``(time, frame)`` for frames ``a..b-1`` at ``fps``."""
        if self.frames is not None:
            yield from (((a + i) / fps, img) for i, img in enumerate(self.frames[a:b]))
        else:
            yield from iter_frames(path, fps=fps, start=a / fps, end=b / fps)


def make_detector(params: Params):
    from scenedetect.detectors import AdaptiveDetector, ContentDetector

    data = params.data
    if data.scene_detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=data.scene_threshold)
    return ContentDetector(threshold=data.scene_threshold)


def detect_cuts(path: str, params: Params, cache: FrameCache | None = None) -> tuple[list[int], int]:
    """Scene cuts (first frame index of each new scene, at ``data.fps``) and the frame count."""
    from scenedetect import FrameTimecode

    fps = params.data.fps
    detector = make_detector(params)
    cuts: list[int] = []
    n = 0
    for n, (_, rgb) in enumerate(iter_frames(path, fps=fps), start=1):
        if cache is not None:
            cache.add(rgb)
        h, w = rgb.shape[:2]
        s = DETECT_SIDE / max(h, w)
        small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA) if s < 1 else rgb
        bgr = np.ascontiguousarray(small[:, :, ::-1])
        cuts += [tc.frame_num for tc in detector.process_frame(FrameTimecode(n - 1, fps=fps), bgr)]
    if n:
        cuts += [tc.frame_num for tc in detector.post_process(FrameTimecode(n - 1, fps=fps))]
    return sorted({c for c in cuts if 0 < c < n}), n


def segments(cuts: list[int], n_frames: int, params: Params, long_term: bool = False) -> list[tuple[int, int]]:
    """Frame ranges ``[a, b)`` of the clips: scenes between cuts, margins removed, split to fit
    ``data.max_clip_seconds`` (no split for long-term videos). Short pieces are returned too."""
    data = params.data
    if long_term:
        return [(0, n_frames)] if n_frames else []
    max_len = max(1, int(math.floor(data.max_clip_seconds * data.fps + 1e-9)))
    bounds = [0, *cuts, n_frames]
    out = []
    for i in range(len(bounds) - 1):
        a = bounds[i] + (data.cut_margin_frames if i > 0 else 0)
        b = bounds[i + 1] - (data.cut_margin_frames if i + 1 < len(bounds) - 1 else 0)
        if b <= a:
            continue
        pieces = math.ceil((b - a) / max_len)
        edges = [a + round(k * (b - a) / pieces) for k in range(pieces + 1)]
        out += [(edges[k], edges[k + 1]) for k in range(pieces)]
    return out


def _count(frames, counter: list[int]):
    for _, img in frames:
        counter[0] += 1
        yield img


def split_video(video: dict, params: Params, out_dir: str) -> dict:
    """One video -> its clips, rejects and cuts."""
    data = params.data
    fps, rate = data.fps, data.audio_rate
    file, vid = video["file"], video["video_id"]
    clips, rejects = [], []
    long_term = bool(video.get("long_term", False))
    cache = FrameCache(0 if long_term else CACHE_BYTES)
    try:
        if long_term:
            cuts, n = [], int(round(float(video["duration"]) * fps))
        else:
            cuts, n = detect_cuts(video["path"], params, cache)
        audio = read_audio(video["path"], rate=rate)
    except MediaError as err:
        return {"clips": [], "cuts": [], "rejects": [reject_row(file, STAGE, "unreadable", str(err))]}
    spf = rate / fps  # audio samples per video frame
    for k, (a, b) in enumerate(segments(cuts, n, params, long_term)):
        clip_id = f"{vid}_{k:03d}"
        span = f"frames {a}-{b} ({a / fps:.2f}-{b / fps:.2f} s)"
        if (b - a) < data.min_clip_seconds * fps - 1e-6:
            rejects.append(reject_row(file, STAGE, "too_short", f"{(b - a) / fps:.2f} s < data.min_clip_seconds {data.min_clip_seconds} s, {span}", clip_id))
            continue
        seg = audio[int(round(a * spf)) : int(round(b * spf))]
        seg = np.pad(seg, (0, max(0, int(round((b - a) * spf)) - len(seg))))
        level = _dbfs(seg)
        if level < data.silence_dbfs:
            rejects.append(reject_row(file, STAGE, "silent_audio", f"{level:.1f} dBFS < data.silence_dbfs {data.silence_dbfs}, {span}", clip_id))
            continue
        path = Path(out_dir) / "clips" / f"{clip_id}.mp4"
        counted = [0]
        try:
            frames = _count(cache.span(video["path"], fps, a, b), counted)
            write_video(path, frames, fps=fps, audio=seg, audio_rate=rate)
        except (MediaError, ValueError) as err:
            remove_partial(path)
            rejects.append(reject_row(file, STAGE, "unreadable", f"{err}, {span}", clip_id))
            continue
        if abs(counted[0] - (b - a)) > 1:
            remove_partial(path)
            rejects.append(reject_row(file, STAGE, "truncated", f"decoded {counted[0]} of {b - a} frames, {span}", clip_id))
            continue
        clips.append({
            "clip_id": clip_id, "video_id": vid, "source_id": video["source_id"], "file": file,
            "start": a / fps, "end": (a + counted[0]) / fps, "n_frames": counted[0], "path": str(path),
            "long_term": long_term, "language": video.get("language"), "duration": counted[0] / fps,
            "width": int(video["width"]) - int(video["width"]) % 2, "height": int(video["height"]) - int(video["height"]) % 2,
        })
    if not clips and not rejects:
        rejects.append(reject_row(file, STAGE, "no_video", "no frames decoded"))
    return {"clips": clips, "cuts": [{"video_id": vid, "file": file, "frame": c, "time": c / fps} for c in cuts],
            "rejects": rejects}


def _dbfs(audio: np.ndarray, window: int = 4000, percentile: float = 90.0) -> float:
    """Same measure as ingest's: ``percentile`` of windowed RMS levels, in dBFS (16 kHz: 0.25 s)."""
    usable = (len(audio) // window) * window
    w = audio[:usable].reshape(-1, window) if usable else audio[None, :]
    if w.size == 0:
        return -200.0
    rms = np.sqrt(np.mean(np.square(w, dtype=np.float64), axis=1))
    return 20.0 * float(np.log10(max(float(np.percentile(rms, percentile)), 1e-10)))


def scenes(videos_path: str | os.PathLike, out_dir: str | os.PathLike, params: Params,
           workers: int | None = None) -> tuple[pd.DataFrame, StageSummary]:
    """Split every ingested video; write ``clips.parquet``, ``cuts.parquet``, ``clips/*.mp4``."""
    started = time.perf_counter()
    workers = workers or params.data.workers
    videos = read_table(videos_path, "ingest")
    out_dir = Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    items = videos.to_dict("records")
    results = map_videos(partial(split_video, params=params, out_dir=str(out_dir)), items, workers,
                         params.data.dask_address, desc=STAGE, cost=lambda v: float(v["duration"]),
                         timeout=params.data.item_timeout_seconds)
    clips, cuts, rejects = [], [], []
    for video, res in zip(items, results):
        if isinstance(res, Crashed):
            rejects.append(reject_row(video["file"], STAGE, res.code, res.reason))
            continue
        clips += res["clips"]
        cuts += res["cuts"]
        rejects += res["rejects"]
    kept = pd.DataFrame(clips, columns=CLIP_COLUMNS)
    _remove_stale(out_dir / "clips", set(kept["clip_id"]))
    write_parquet(pd.DataFrame(cuts, columns=CUT_COLUMNS), out_dir / "cuts.parquet")
    summary = finish_stage(STAGE, out_dir, "clips", kept, rejects, started,
                           video_seconds=float(videos["duration"].sum()), workers=workers,
                           extra={"cuts": len(cuts), "clip_seconds": float(kept["duration"].sum())})
    return kept, summary


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete clip files of an earlier run that this run did not write (DVC outputs stay exact)."""
    for p in folder.glob("*.mp4"):
        if p.stem not in keep:
            p.unlink()
