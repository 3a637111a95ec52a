"""sync_filter: drop clips whose audio and lips are out of sync (paper's data step 4, issue 3).

For every clip of ``data/quality/kept.parquet`` a SyncNet of ``syncnet_train`` that never saw the
clip (or the official weights it converted) scores the face crop against its own audio with the
standard offset search (``mcdm.models.sync.scoring.sync_scores``, the same code as the Sync-C / Sync-D
metrics). ``syncnet_train`` trains two SyncNets on two folds of identities and lists each clip's fold
in ``<model>/training_clips.csv``: a clip of the ``metric`` fold is scored by the ``cross_fit`` SyncNet
(``<model>/cross_fit/``), every other clip by the ``metric`` SyncNet (``<model>/``), which is also the
one that measures Sync-C / Sync-D. Without a fold table or a cross-fit model (official weights) the
one SyncNet scores every clip.

- ``av_offset`` (frames; negative = audio lags video), ``sync_conf`` (Sync-C), ``sync_dist`` (Sync-D);
- rejected when ``|av_offset| > data.syncnet.max_abs_offset`` (``av_offset``) or ``sync_conf`` is below
  ``data.syncnet.min_confidence`` (``min_confidence_official`` for the official network) (``low_sync_conf``);
  an unreadable or too-short clip is a reject too, never a silent loss.

Outputs: ``<out>/kept.parquet`` (quality columns + ``av_offset, sync_conf, sync_dist``),
``<out>/rejects.csv``, ``<out>/summary.json`` and ``<out>/scores.csv`` (every scored clip with its
decision, for the report and threshold tuning).
"""
from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from mcdm.config import Params
from mcdm.data.parallel import Crashed, map_videos, stage_workers
from mcdm.data.rejects import StageSummary, finish_stage, reject_row
from mcdm.media.files import write_csv
from mcdm.media.io import AUDIO_RATE, MediaError, read_audio, read_frames
from mcdm.models.sync.scoring import SYNC_FPS, backend_name, sync_scores
from mcdm.models.sync.syncnet import OfficialSyncNet, load_syncnet

STAGE = "sync_filter"
SCORE_COLUMNS = ["av_offset", "sync_conf", "sync_dist"]
CROSS_FIT_DIR, FOLD_TABLE = "cross_fit", "training_clips.csv"  # inside the syncnet_train folder
_MODELS: dict[tuple[str, int], object] = {}  # per process: (model dir, torch threads) -> model


def _model(model_path: str, threads: int):
    import torch

    key = (str(Path(model_path).resolve()), threads)
    if key not in _MODELS:
        if threads > 0:
            torch.set_num_threads(threads)
        _MODELS[key] = load_syncnet(model_path)
    return _MODELS[key]


def read_sync_clip(crop_path: str | os.PathLike, landmarks_path: str | os.PathLike | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A crop mp4's frames at SyncNet's 25 fps, its 16 kHz mono audio and (from the faces stage's npz,
    when given) its (T, 68, 2) landmarks: what :func:`mcdm.models.sync.scoring.sync_scores` takes."""
    frames = read_frames(crop_path, fps=SYNC_FPS)
    audio = read_audio(crop_path, rate=AUDIO_RATE)
    landmarks = None
    if landmarks_path is not None:
        with np.load(landmarks_path) as npz:
            landmarks = npz["landmarks"]
    return frames, audio, landmarks


def scoring_model(model_path: str | os.PathLike, clip_ids) -> list[str]:
    """Per clip, the folder of the SyncNet that never saw it: ``<model>/cross_fit`` for the clips of
    the ``metric`` fold (``<model>/training_clips.csv``), ``<model>`` for every other clip."""
    model_path = Path(model_path)
    table, cross = model_path / FOLD_TABLE, model_path / CROSS_FIT_DIR
    if not table.is_file() or not (cross / "config.json").is_file():
        return [str(model_path)] * len(clip_ids)
    folds = pd.read_csv(table, dtype={"clip_id": str})
    metric_fold = set(folds.loc[folds["fold"] == "metric", "clip_id"])
    return [str(cross) if str(c) in metric_fold else str(model_path) for c in clip_ids]


def score_clip(row: dict, model_path: str, max_offset: int, threads: int = 0) -> dict:
    """Sync scores of one clip row with the SyncNet at ``row["scored_by"]`` (default ``model_path``),
    or ``{"error": reason}`` for an unusable clip."""
    model = _model(row.get("scored_by") or model_path, threads)
    lm = row.get("landmarks_path")
    landmarks = lm if isinstance(lm, str) and lm and Path(lm).is_file() else None
    try:
        return sync_scores(*read_sync_clip(row["crop_path"], landmarks), model=model, max_offset=max_offset)
    except MediaError as err:
        return {"error": f"unreadable: {err}"}
    except ValueError as err:  # too short for one 5-frame window
        return {"error": f"too_short: {err}"}


def min_confidence(params: Params, model) -> float:
    sp = params.data.syncnet
    return sp.min_confidence_official if isinstance(model, OfficialSyncNet) else sp.min_confidence


def sync_filter(clips: pd.DataFrame, model_path: str | os.PathLike, params: Params,
                out_dir: str | os.PathLike) -> StageSummary:
    """Score every clip, write kept / rejects / scores under ``out_dir``; return the summary."""
    started = time.perf_counter()
    sp = params.data.syncnet
    model = load_syncnet(model_path)  # fail early, in this process, on a missing or bad model
    conf_cut = min_confidence(params, model)
    workers = stage_workers(params.data.workers, params.data.dask_address, multithreaded=True)
    rows = [{**row, "scored_by": by} for row, by in zip(clips.to_dict("records"), scoring_model(model_path, clips["clip_id"]))]
    fn = partial(score_clip, model_path=str(model_path), max_offset=sp.max_offset,
                 threads=1 if (workers > 1 or params.data.dask_address) else 0)
    results = map_videos(fn, rows, workers=workers, address=params.data.dask_address, desc=STAGE,
                         cost=lambda r: float(r.get("n_frames") or 0),
                         timeout=params.data.item_timeout_seconds)
    kept, rejects, scored = [], [], []
    for row, res in zip(rows, results):
        file, clip_id = str(row.get("file", row["clip_id"])), str(row["clip_id"])
        if isinstance(res, Crashed):
            rejects.append(reject_row(file, STAGE, res.code, res.reason, clip_id))
            continue
        if "error" in res:
            code, _, detail = res["error"].partition(": ")
            rejects.append(reject_row(file, STAGE, code, detail, clip_id))
            continue
        reason = None
        if abs(res["av_offset"]) > sp.max_abs_offset:
            reason = reject_row(file, STAGE, "av_offset",
                                f"|{res['av_offset']}| > {sp.max_abs_offset} frames", clip_id)
        elif res["sync_conf"] < conf_cut:
            reason = reject_row(file, STAGE, "low_sync_conf", f"Sync-C {res['sync_conf']:.3f} < {conf_cut:g}", clip_id)
        scored.append({"clip_id": clip_id, "file": file, **{k: res[k] for k in SCORE_COLUMNS},
                       "n_windows": res["n_windows"], "kept": reason is None,
                       "reason": "" if reason is None else reason["reason"],
                       "scored_by": os.path.relpath(row["scored_by"], model_path)})
        if reason is None:
            kept.append({**{k: v for k, v in row.items() if k != "scored_by"}, **{k: res[k] for k in SCORE_COLUMNS}})
        else:
            rejects.append(reason)
    out_dir = Path(out_dir)
    score_cols = ["clip_id", "file", *SCORE_COLUMNS, "n_windows", "kept", "reason", "scored_by"]
    write_csv(pd.DataFrame(scored, columns=score_cols), out_dir / "scores.csv")
    kept_df = pd.DataFrame(kept, columns=[c for c in clips.columns if c not in SCORE_COLUMNS] + SCORE_COLUMNS)
    n_frames = pd.to_numeric(clips["n_frames"], errors="coerce").fillna(0) if "n_frames" in clips else pd.Series([0])
    extra = {"sync_backend": backend_name(model), "min_confidence": conf_cut,
             "max_abs_offset": sp.max_abs_offset, "max_offset": sp.max_offset}
    return finish_stage(STAGE, out_dir, "kept", kept_df, rejects, started, float(n_frames.sum()) / params.data.fps,
                        workers=workers, extra=extra)
