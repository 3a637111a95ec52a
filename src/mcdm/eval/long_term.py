"""Figure 5: a long generated sequence measured over the frame index and per time window
(decisions.md #11).

The first ``eval.long_term_clips`` long-term test clips (else the longest test clip, labelled) are
generated TOGETHER, as one batch, for ``min(eval.long_term_seconds, clip length)`` each, from the
clip's reference frame and audio, clip by clip (constant memory), the generator seeded with ``seed``
(every matrix member at that seed sees the same noise). Measured while streaming:

* the curve (``long_term.csv``), a row every ``eval.long_term_every`` frames (at most a window's):
  ``frame``, ``ssim``
  (mean SSIM against ground truth over those frames), ``identity`` (dlib-descriptor distance of the
  generated frame to the reference, a lost face charged ``IDENTITY_FAILURE_DISTANCE``), ``no_face``,
  ``identity_gt`` (ground truth's own distance, when ``ground_truth``); the mean over clips;
* the windows (``long_term_windows.csv``), per clip and per ``eval.long_term_window_seconds`` window
  (whole windows; one shorter window when the sequence is shorter than one): ``ssim`` (every frame),
  ``identity`` and ``no_face_frames`` over the curve's frames, ``sync_c`` / ``sync_d`` (SyncNet on the
  window's frames against its audio, mouth crops from the landmarks of the curve's frames,
  interpolated between them) and ``identity_gt``.

Per clip, ``ssim_decay`` = first window's SSIM - last window's and ``identity_drift`` = last window's
identity - first window's: what Figure 5 and decisions.md #20 compare between variants.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mcdm.config import Params
from mcdm.errors import McdmError
from mcdm.eval import metrics as M
from mcdm.eval.failures import penalised_identity
from mcdm.eval.plots import plot_long_term
from mcdm.eval.suite import MetricSuite
from mcdm.eval.test_set import ClipFeatures, read_index
from mcdm.eval.video_metrics import _nanmean
from mcdm.media.files import jsonable, write_csv
from mcdm.media.io import write_video
from mcdm.pipelines.loading import load_from_models_dir

WINDOW_COLUMNS = ["clip_id", "window", "start_s", "end_s", "frames", "ssim", "identity", "identity_frames",
                  "no_face_frames", "identity_gt", "sync_c", "sync_d"]


def window_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """Whole ``size``-frame windows of ``n`` frames (the remainder dropped), or one window of all
    ``n`` frames when ``n < size``."""
    if n < size:
        return [(0, n)]
    return [(s, s + size) for s in range(0, n - size + 1, size)]


@dataclass
class _Clip:
    """One long-term clip's inputs and what has been measured of it so far."""

    clip_id: str
    features: ClipFeatures
    n: int
    ref: np.ndarray
    wave: np.ndarray
    with_identity: bool
    ssim: np.ndarray = field(init=False)
    identity: np.ndarray = field(init=False)
    identity_gt: np.ndarray = field(init=False)
    landmarks: np.ndarray = field(init=False)
    pending: list = field(default_factory=list)  # generated frames from pending_start on (the open window's)
    pending_start: int = 0
    windows: list = field(default_factory=list)

    def __post_init__(self):
        self.ssim = np.full(self.n, np.nan)
        self.identity, self.identity_gt = np.full(self.n, np.nan), np.full(self.n, np.nan)
        self.landmarks = np.full((self.n, 68, 2), np.nan)


def _choose(features_dir, params: Params) -> tuple[pd.DataFrame, str]:
    test = read_index(features_dir)
    test = test[test["split"] == "test"]
    if test.empty:
        raise McdmError("features: the test split holds no clip for the long-term curve")
    chosen, source = test[test["long_term"]], "long_term"
    if chosen.empty:
        chosen, source = test.sort_values("n_frames", ascending=False), "longest test clip (no long_term clip in the test split)"
    return chosen.sort_values("clip_id").head(params.eval.long_term_clips), source


def _window_row(c: _Clip, start: int, stop: int, frames: np.ndarray, suite: MetricSuite, params: Params,
                k: int) -> dict:
    fps, rate = params.data.fps, params.data.audio_rate
    ident = c.identity[np.arange(start + (-start) % k, stop, k)]  # the curve's frames in this window
    row = {"clip_id": c.clip_id, "window": len(c.windows), "start_s": start / fps, "end_s": stop / fps,
           "frames": stop - start, "ssim": float(np.mean(c.ssim[start:stop])),
           "identity": float(penalised_identity(ident).mean()) if c.with_identity and len(ident) else None,
           "identity_frames": int(len(ident)) if c.with_identity else 0,
           "no_face_frames": int((~np.isfinite(ident)).sum()) if c.with_identity else 0,
           "identity_gt": _nanmean(c.identity_gt[start:stop]), "sync_c": None, "sync_d": None}
    if suite.syncnet is not None:
        audio = c.wave[int(round(start / fps * rate)):int(round(stop / fps * rate))]
        try:
            sync = suite.sync_one(frames, audio, landmarks=c.landmarks[start:stop])
            row.update(sync_c=sync["sync_c"].value, sync_d=sync["sync_d"].value)
        except (McdmError, ValueError):  # a window too short for one SyncNet window: no value
            pass
    return row


def long_term_curve(pipe, features_dir: str | Path, csv_path: str | Path, params: Params,
                    png_path: Optional[str | Path] = None, video_dir: Optional[str | Path] = None,
                    suite: Optional[MetricSuite] = None, label: Optional[str] = None, progress: bool = True,
                    windows_path: Optional[str | Path] = None, ground_truth: bool = True) -> dict:
    """Generate and measure the long-term clips (module docstring). ``pipe``: an ``MCDMPipeline`` or a
    models folder; ``suite``: the run's metrics (its dlib cache and SyncNet; without a SyncNet no
    Sync-C/D); ``ground_truth`` False skips ground truth's identity (the main line measures it; the
    matrix members measure the same clips). Writes ``csv_path`` (and ``windows_path``, ``png_path``,
    ``video_dir/long_term_<first clip>.mp4`` with its audio); returns the summary."""

    started = time.perf_counter()
    if isinstance(pipe, (str, Path)):
        pipe = load_from_models_dir(pipe, params)
    p, fps, rate = params.eval, params.data.fps, params.data.audio_rate
    suite = suite or MetricSuite(p, fps=fps)
    chosen, source = _choose(features_dir, params)
    clips = []
    for row in chosen.to_dict("records"):
        feats = ClipFeatures(row["file"])
        n = min(feats.n_frames, max(1, int(round(p.long_term_seconds * fps))))
        ref = feats.frames(0, 1)
        try:
            M.identity_curve(ref[0], ref, suite.faces)
            with_identity = True
        except McdmError:
            with_identity = False  # no face in the reference: identity cannot be measured
        clips.append(_Clip(str(row["clip_id"]), feats, n, ref, feats.waveform(n, fps, rate), with_identity))
    total = max(c.n for c in clips)
    ref_latent, ref_emb = pipe.encode_reference(np.concatenate([c.ref for c in clips]),
                                                np.concatenate([c.features.landmarks(0, 1) for c in clips]))
    feats = torch.stack([pipe.audio_features(np.pad(c.wave, (0, int(round(total / fps * rate)) - len(c.wave))), total)
                         for c in clips])
    lm = pose = None
    if p.use_landmarks:
        driving = [np.concatenate([c.features.landmarks(0, c.n)] + [c.features.landmarks(c.n - 1, c.n)] * (total - c.n))
                   for c in clips]
        lm, pose = zip(*(pipe.prepare_driving(d, total) for d in driving))
        lm, pose = torch.cat(lm), torch.cat(pose)  # each (1, total, ...) -> (B, total, ...)
    states = pipe.iter_clips(ref_latent, ref_emb, feats, landmarks=lm, head_pose=pose, num_inference_steps=p.steps,
                             generator=torch.Generator().manual_seed(params.seed))
    size = max(1, int(round(p.long_term_window_seconds * fps)))
    k = min(p.long_term_every, size)  # every window holds at least one identity frame
    bar = tqdm(total=sum(c.n for c in clips), desc="long-term " + ", ".join(c.clip_id for c in clips), unit="frame",
               disable=not progress)

    def measure(c: _Clip, fake: np.ndarray, s: int) -> None:
        e = min(s + len(fake), c.n)
        fake = fake[: e - s]
        if not len(fake):
            return
        gt = c.features.frames(s, e)
        c.ssim[s:e] = M.ssim(gt, fake, 255.0)
        picks = np.arange(s + (-s) % k, e, k)
        if c.with_identity and len(picks):
            c.identity[picks] = M.identity_curve(c.ref[0], fake[picks - s], suite.faces)
            c.landmarks[picks] = suite.faces.landmarks(fake[picks - s])
            if ground_truth:
                c.identity_gt[picks] = M.identity_curve(c.ref[0], gt[picks - s], suite.faces)
        c.pending.extend(fake)
        bounds = window_bounds(c.n, size)
        while len(c.windows) < len(bounds) and bounds[len(c.windows)][1] <= e:
            start, stop = bounds[len(c.windows)]
            frames = np.stack(c.pending[start - c.pending_start:stop - c.pending_start])
            c.windows.append(_window_row(c, start, stop, frames, suite, params, k))
        keep_from = bounds[len(c.windows)][0] if len(c.windows) < len(bounds) else e
        c.pending, c.pending_start = c.pending[keep_from - c.pending_start:], keep_from
        bar.update(len(fake))

    def first_clip_frames():
        for state in states:
            for c, fake in zip(clips, state.frames):
                measure(c, fake, state.start)
            yield from state.frames[0][: max(0, clips[0].n - state.start)]

    if video_dir is not None:
        write_video(Path(video_dir) / f"long_term_{clips[0].clip_id}.mp4", first_clip_frames(), fps=fps,
                    audio=clips[0].wave, audio_rate=rate)
    else:
        for _ in first_clip_frames():
            pass
    bar.close()
    summary = _write(clips, source, csv_path, windows_path, png_path, label or pipe.variant, params, k)
    return {**summary, "wall_s": round(time.perf_counter() - started, 2)}


def _curve(c: _Clip, k: int) -> pd.DataFrame:
    starts = np.arange(0, c.n, k)
    return pd.DataFrame({"frame": starts, "ssim": [np.nanmean(c.ssim[f:f + k]) for f in starts],
                         "identity": penalised_identity(c.identity[starts]) if c.with_identity else np.nan,
                         "no_face": (~np.isfinite(c.identity[starts])).astype(float) if c.with_identity else np.nan,
                         "identity_gt": c.identity_gt[starts]})


def _write(clips: list[_Clip], source: str, csv_path, windows_path, png_path, name: str, params: Params,
           k: int) -> dict:
    p, fps = params.eval, params.data.fps
    tables = [_curve(c, k) for c in clips]
    curve = pd.concat(tables).groupby("frame", as_index=False).mean() if len(tables) > 1 else tables[0]
    write_csv(curve, Path(csv_path))
    windows = pd.DataFrame([w for c in clips for w in c.windows], columns=WINDOW_COLUMNS)
    if windows_path is not None:
        write_csv(windows, Path(windows_path))
    if png_path is not None:
        plot_long_term({name: curve}, png_path, title=f"long-term generation ({name}, {max(c.n for c in clips) / fps:.1f} s, "
                                                      f"{', '.join(c.clip_id for c in clips)})")
    tail = max(1, int(round(p.drift_tail * len(curve))))

    def first_last(col):
        values = curve[col].to_numpy(np.float64)
        return _nanmean(values[:tail]), _nanmean(values[-tail:])

    s_first, s_last = first_last("ssim")
    per_clip = windows.groupby("clip_id", sort=False)
    ends = pd.DataFrame({"ssim_decay": per_clip["ssim"].first() - per_clip["ssim"].last(),
                         "identity_drift": per_clip["identity"].last() - per_clip["identity"].first()})
    identity_frames = int(windows["identity_frames"].sum())
    return jsonable({
        "clips": [c.clip_id for c in clips], "source": source, "frames": int(max(c.n for c in clips)),
        "seconds": float(max(c.n for c in clips) / fps), "every": k,
        "window_seconds": p.long_term_window_seconds, "windows_per_clip": int(per_clip.size().min()),
        "ssim_mean": _nanmean(curve["ssim"]), "ssim_first": s_first, "ssim_last": s_last,
        "ssim_drift": None if s_first is None or s_last is None else s_last - s_first,
        "identity_mean": _nanmean(curve["identity"]), "identity_drift": M.curve_drift(curve["identity"], p.drift_tail),
        "identity_gt_mean": _nanmean(curve["identity_gt"]),
        "identity_gt_drift": M.curve_drift(curve["identity_gt"], p.drift_tail),
        "identity_failure_rate": int(windows["no_face_frames"].sum()) / identity_frames if identity_frames else None,
        "window_ssim_decay": _nanmean(ends["ssim_decay"]), "window_identity_drift": _nanmean(ends["identity_drift"]),
        "window_sync_c": _nanmean(windows["sync_c"].astype(float)),
    })
