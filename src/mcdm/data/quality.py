"""quality: a no-reference quality filter on each face clip.

The default backend is ``classical`` (named so in every output). On up to ``data.quality.sample_frames``
evenly spaced frames of the clip, over the smoothed FACE box in the source frames (the scene clip at
its original resolution, so a low-resolution source is not hidden by the crop's resize):

- resolution: the median source face side (``face_px`` from faces) >= ``data.quality.min_resolution``;
- sharpness: variance of the 4-neighbour Laplacian of the face, resized to ``data.quality.analysis_px``
  square (a fixed analysis size makes clips of any resolution comparable; an upscaled small or
  blurred face scores low) >= ``data.quality.min_sharpness``;
- exposure: mean BT.601 luma of the face in [``min_brightness``, ``max_brightness``];
- blockiness: mean |horizontal / vertical step| across the 8x8 block boundaries of the source pixel
  grid divided by the mean step inside blocks (~1 for natural images, > 1 for visible JPEG/MPEG
  blocks) <= ``data.quality.max_blockiness``.

Each measure is the median over the sampled frames. ``data.quality.backend: hyperiqa`` adds a learned
score from a local TorchScript export of HyperIQA (``data.quality.hyperiqa_path``: (N,3,224,224)
ImageNet-normalised RGB -> (N,) scores in [0, 100]); a clip then also needs a median score >=
``data.quality.min_iqa_score``. Reject codes: ``low_resolution``, ``too_dark``, ``too_bright``, ``blurry``,
``blocky``, ``low_iqa`` (the first failing one names the row; the detail lists every measure).

Outputs: ``kept.parquet`` (faces columns + ``sharpness, brightness, blockiness, iqa_score,
quality_backend``) and ``scores.parquet`` (the same measures for every measured clip, kept or not:
for tuning thresholds).
"""
from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mcdm.config import Params
from mcdm.data.parallel import Crashed, map_videos, stage_workers
from mcdm.data.rejects import StageSummary, finish_stage, reject_row
from mcdm.errors import McdmError
from mcdm.media.files import read_table, write_parquet
from mcdm.media.io import MediaError, iter_frames

STAGE = "quality"
BLOCK = 8
MEASURES = ["sharpness", "brightness", "blockiness", "iqa_score"]


# -------------------------------------------------------------------------------------- measures
def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma, float64: 0.299 R + 0.587 G + 0.114 B."""
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian (kernel [[0,1,0],[1,-4,1],[0,1,0]], mirrored borders)."""
    return float(cv2.Laplacian(np.asarray(gray, np.float64), cv2.CV_64F, ksize=1, borderType=cv2.BORDER_REFLECT_101).var())


def blockiness(gray: np.ndarray, x0: int = 0, y0: int = 0, block: int = BLOCK) -> float:
    """Mean absolute step across block boundaries / mean step inside blocks (both directions).

    ``(x0, y0)`` is where ``gray`` sits in the frame, so the boundaries are those of the frame's
    pixel grid (the codec's blocks), not of the cut-out.
    """
    g = np.asarray(gray, np.float64)
    ratios = []
    for axis, origin in ((1, x0), (0, y0)):
        steps = np.abs(np.diff(g, axis=axis))  # step k lies between pixel k and k+1
        if steps.shape[axis] < 2 * block:
            continue
        pos = origin + np.arange(steps.shape[axis]) + 1  # absolute index of the pixel after the step
        at_edge = pos % block == 0
        edge = np.take(steps, np.flatnonzero(at_edge), axis=axis).mean()
        inside = np.take(steps, np.flatnonzero(~at_edge), axis=axis).mean()
        ratios.append(edge / max(inside, 1e-6))
    return float(np.mean(ratios)) if ratios else 1.0


def face_region(img: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The face box (clipped to the frame) and its top-left corner."""
    h, w = img.shape[:2]
    l, t = int(max(0, np.floor(box[0]))), int(max(0, np.floor(box[1])))
    r, b = int(min(w, np.ceil(box[2]))), int(min(h, np.ceil(box[3])))
    return img[t:b, l:r], l, t


def measure_frame(img: np.ndarray, box: np.ndarray, analysis_px: int) -> dict[str, float]:
    region, x0, y0 = face_region(img, box)
    if region.size == 0:
        return {"sharpness": 0.0, "brightness": 0.0, "blockiness": 1.0}
    gray = luma(region)
    side = analysis_px
    interp = cv2.INTER_AREA if min(gray.shape) > side else cv2.INTER_CUBIC
    norm = cv2.resize(gray, (side, side), interpolation=interp)
    return {"sharpness": sharpness(norm), "brightness": float(gray.mean()), "blockiness": blockiness(gray, x0, y0)}


class HyperIqa:
    """HyperIQA from a local TorchScript file: (N,3,224,224) ImageNet-normalised RGB -> scores."""

    _loaded: dict[str, object] = {}  # path -> model, once per process

    def __init__(self, path: str | None):
        if not path or not Path(path).is_file():
            raise McdmError(f"data.quality.backend is 'hyperiqa' but data.quality.hyperiqa_path {path!r} is not a file")
        self.path = str(path)

    def score(self, regions: list[np.ndarray]) -> float:
        import torch

        if self.path not in self._loaded:
            self._loaded[self.path] = torch.jit.load(self.path, map_location="cpu").eval()
        model = self._loaded[self.path]
        mean = np.array([0.485, 0.456, 0.406])
        std = np.array([0.229, 0.224, 0.225])
        x = np.stack([(cv2.resize(r, (224, 224)) / 255.0 - mean) / std for r in regions if r.size])
        with torch.no_grad():
            out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)).float())
        return float(np.median(np.asarray(out, np.float64).reshape(-1)))


# ------------------------------------------------------------------------------------------ clip
def measure_clip(clip: dict, params: Params) -> dict:
    """Median measures over the sampled frames of one face clip."""
    q, fps = params.data.quality, params.data.fps
    boxes = np.load(clip["landmarks_path"])["boxes"]
    n = int(clip["n_frames"])
    picks = set(np.linspace(0, n - 1, min(q.sample_frames, n)).round().astype(int).tolist())
    a = int(clip["scene_offset"])
    per_frame, regions = [], []
    for i, (_, img) in enumerate(iter_frames(clip["scene_path"], fps=fps, start=a / fps, end=(a + n) / fps)):
        if i in picks:
            per_frame.append(measure_frame(img, boxes[min(i, len(boxes) - 1)], q.analysis_px))
            if q.backend == "hyperiqa":
                regions.append(face_region(img, boxes[min(i, len(boxes) - 1)])[0])
    if not per_frame:
        raise MediaError("no frames decoded")
    out = {k: float(np.median([m[k] for m in per_frame])) for k in ("sharpness", "brightness", "blockiness")}
    out["iqa_score"] = HyperIqa(q.hyperiqa_path).score(regions) if q.backend == "hyperiqa" else float("nan")
    return out


def failures(clip: dict, m: dict, params: Params) -> list[tuple[str, str]]:
    """``(code, detail)`` for every threshold the clip misses, in reporting order."""
    q = params.data.quality
    out = []
    if clip["face_px"] < q.min_resolution:
        out.append(("low_resolution", f"face {clip['face_px']:.0f} px < data.quality.min_resolution {q.min_resolution}"))
    if m["brightness"] < q.min_brightness:
        out.append(("too_dark", f"brightness {m['brightness']:.0f} < data.quality.min_brightness {q.min_brightness}"))
    if m["brightness"] > q.max_brightness:
        out.append(("too_bright", f"brightness {m['brightness']:.0f} > data.quality.max_brightness {q.max_brightness}"))
    if m["sharpness"] < q.min_sharpness:
        out.append(("blurry", f"sharpness {m['sharpness']:.1f} < data.quality.min_sharpness {q.min_sharpness}"))
    if m["blockiness"] > q.max_blockiness:
        out.append(("blocky", f"blockiness {m['blockiness']:.2f} > data.quality.max_blockiness {q.max_blockiness}"))
    if q.backend == "hyperiqa" and not (m["iqa_score"] >= q.min_iqa_score):
        out.append(("low_iqa", f"HyperIQA {m['iqa_score']:.1f} < data.quality.min_iqa_score {q.min_iqa_score}"))
    return out


def check_clip(clip: dict, params: Params) -> dict:
    try:
        m = measure_clip(clip, params)
    except (MediaError, OSError, KeyError) as err:
        return {"measures": None, "reject": reject_row(clip["file"], STAGE, "unreadable", str(err), clip["clip_id"])}
    fails = failures(clip, m, params)
    if fails:
        detail = "; ".join(d for _, d in fails)
        return {"measures": m, "reject": reject_row(clip["file"], STAGE, fails[0][0], detail, clip["clip_id"])}
    return {"measures": m, "reject": None}


# ----------------------------------------------------------------------------------------- stage
def quality(faces_path: str | os.PathLike, out_dir: str | os.PathLike, params: Params,
            workers: int | None = None) -> tuple[pd.DataFrame, StageSummary]:
    """Measure and filter every face clip; write ``kept.parquet``, ``scores.parquet`` + rejects."""
    started = time.perf_counter()
    workers = workers or stage_workers(params.data.workers, params.data.dask_address, multithreaded=True)
    backend = params.data.quality.backend
    if backend == "hyperiqa":
        HyperIqa(params.data.quality.hyperiqa_path)  # a missing file stops here with one line
    table = read_table(faces_path, "faces")
    items = table.to_dict("records")
    results = map_videos(partial(check_clip, params=params), items, workers, params.data.dask_address,
                         desc=STAGE, cost=lambda c: float(c["n_frames"]),
                         timeout=params.data.item_timeout_seconds)
    kept, scores, rejects = [], [], []
    for clip, res in zip(items, results):
        if isinstance(res, Crashed):
            rejects.append(reject_row(clip["file"], STAGE, res.code, res.reason, clip["clip_id"]))
            continue
        if res["measures"] is not None:
            scores.append({"clip_id": clip["clip_id"], "file": clip["file"], "face_px": clip["face_px"],
                           **res["measures"], "kept": res["reject"] is None, "quality_backend": backend})
        if res["reject"] is not None:
            rejects.append(res["reject"])
        else:
            kept.append({**clip, **res["measures"], "quality_backend": backend})
    kept_df = pd.DataFrame(kept, columns=list(table.columns) + MEASURES + ["quality_backend"])
    write_parquet(pd.DataFrame(scores, columns=["clip_id", "file", "face_px", *MEASURES, "kept", "quality_backend"]),
                  Path(out_dir) / "scores.parquet")
    summary = finish_stage(STAGE, out_dir, "kept", kept_df, rejects, started,
                           video_seconds=float(table["n_frames"].sum()) / params.data.fps, workers=workers,
                           extra={"quality_backend": backend})
    return kept_df, summary
