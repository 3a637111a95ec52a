"""Train the small SyncNet on face-filtered clips: in-sync vs randomly shifted audio (decisions.md #22).

Objective (Chung & Zisserman 2017, Eq. 1, contrastive loss on the embedding distance): for pairs of a
5-frame mouth window ``v`` and a 0.2 s MFCC window ``a`` with label ``y`` (1 in sync, 0 shifted),

    d = ||f_v(v) - f_a(a)||_2                 (embeddings L2-normalised, so d in [0, 2])
    E = 1 / (2N) sum_n  y_n d_n^2 + (1 - y_n) max(margin - d_n, 0)^2

Each step draws ``batch_size`` video windows (clips weighted by length), pairs each with its own
audio window (positive) and with the same clip's audio shifted by ``s`` frames, ``min_shift <= |s|
<= max_offset`` (negative): the network can only tell them apart by the audio-lip correspondence.

Clips are held out by source (identity) to report, on clips never trained on: pair AUC / accuracy of
in-sync vs shifted windows, and how often the offset search finds the true offset (|offset| <= 1).
The report states how many planted out-of-sync clips (sample data ground truth) were trained on.

Two folds, so that no clip is measured by a SyncNet that saw it (:func:`syncnet_folds`). The stage runs
before the sync filter and the split, so it decides the split's roles itself, with the split's own
function on the same clips (``mcdm.data.split.clip_roles``: the split stage decides them on
``data/quality/kept.parquet`` too):

* ``metric`` fold: the training split's clips. The SyncNet trained on it (``<out>/``) measures Sync-C /
  Sync-D in evaluation and scores the other fold in the sync filter: it never saw a test, open-set or
  long-term clip, nor the identity of a regular test clip or of the open set. (A long-term clip's
  identity may have regular clips in training, as for the generator: the split keeps long-term
  videos whole for the long-term curve, not apart by identity; the unseen-identity test is the open
  set.)
* ``cross_fit`` fold: every other clip (test, long-term, open-set). The SyncNet trained on it
  (``<out>/cross_fit/``) scores the ``metric`` fold in the sync filter.

``<out>/training_clips.csv`` lists every clip with its group, split role, fold and what its fold's
SyncNet did with it (``trained``, ``held_out`` for the accuracy report, ``unusable``).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F
from tqdm.auto import tqdm

from mcdm.config import Params, SyncNetParams
from mcdm.data.parallel import Crashed, map_videos
from mcdm.data.split import TRAIN, clip_roles
from mcdm.data.sync_filter import CROSS_FIT_DIR, FOLD_TABLE, read_sync_clip
from mcdm.errors import McdmError
from mcdm.media.files import read_table, write_csv, write_json
from mcdm.media.io import AUDIO_RATE, MediaError, read_audio, read_frames
from mcdm.models.sync.mfcc import mfcc, mfcc_windows, n_windows
from mcdm.models.sync.offset import av_offset
from mcdm.models.sync.scoring import SYNC_FPS, embed_clip, mouth_crops, sync_scores, video_windows
from mcdm.models.sync.syncnet import SyncNet, load_syncnet
from mcdm.train.steps import StepLoop


@dataclass
class SyncClip:
    """One clip's network inputs, ready to sample windows from."""

    clip_id: str
    group: str  # source / identity: the hold-out unit
    per_frame: np.ndarray  # (T, C, h, w) the network's video input per frame (see evaluate.video_input)
    cep: np.ndarray  # (13, M) MFCCs at 100 Hz
    planted_shift_s: float = 0.0  # ground-truth audio shift of a planted out-of-sync clip (0: clean)

    @property
    def n_windows(self) -> int:
        return n_windows(len(self.per_frame), self.cep.shape[1])


def make_clip(clip_id: str, group: str, frames: np.ndarray, audio: np.ndarray, landmarks: np.ndarray | None,
              mouth_size: tuple[int, int], planted_shift_s: float = 0.0) -> SyncClip:
    """A ``SyncClip`` from RGB frames (25 fps), 16 kHz audio and optional ``(T, 68, 2)`` landmarks."""
    per_frame = mouth_crops(frames, landmarks, mouth_size)[:, None].astype(np.float16)  # [0, 1], half memory
    return SyncClip(clip_id, group, per_frame, mfcc(audio), float(planted_shift_s))


def load_clip(row: dict, mouth_size: tuple[int, int]) -> SyncClip:
    """A ``SyncClip`` from a faces/quality table row (``crop_path`` mp4 with audio, ``landmarks_path``).

    ``row["planted_shift_s"]`` (sample ground truth, when joined) marks planted out-of-sync clips.
    """
    frames = read_frames(row["crop_path"], fps=SYNC_FPS)
    audio = read_audio(row["crop_path"], rate=AUDIO_RATE)
    landmarks = None
    lm_path = row.get("landmarks_path")
    if isinstance(lm_path, str) and lm_path and Path(lm_path).is_file():
        with np.load(lm_path) as npz:
            landmarks = npz["landmarks"]
    group = str(row.get("source_id") or row.get("video_id") or row["clip_id"])
    planted = row.get("planted_shift_s", 0.0)
    return make_clip(str(row["clip_id"]), group, frames, audio, landmarks, mouth_size,
                     0.0 if planted is None else float(planted))


def new_syncnet(params: SyncNetParams) -> SyncNet:
    """An untrained ``SyncNet`` sized by ``params``."""
    return SyncNet(mouth_height=params.mouth_height, mouth_width=params.mouth_width,
                   channels=tuple(params.channels), embed_dim=params.embed_dim)


def sample_pairs(clips: Sequence[SyncClip], batch_size: int, min_shift: int, max_shift: int,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` video windows with two audio windows each: ``video (B, C, 5, h, w)`` and
    ``mfcc (2, B, 1, 13, 20)``, where ``mfcc[0]`` is in sync (label 1) and ``mfcc[1]`` is the same
    clip's audio shifted by ``min_shift <= |s| <= max_shift`` frames (label 0)."""
    counts = np.array([c.n_windows for c in clips], np.float64)
    probs = np.where(counts > min_shift, counts, 0.0)  # a shift of >= min_shift must fit in the clip
    probs /= probs.sum()
    all_shifts = np.concatenate([np.arange(-max_shift, -min_shift + 1), np.arange(min_shift, max_shift + 1)])
    video, audio = [], []
    for ci in rng.choice(len(clips), size=batch_size, p=probs):
        clip, n = clips[ci], int(counts[ci])
        while True:
            v = int(rng.integers(n))
            shifts = all_shifts[(v + all_shifts >= 0) & (v + all_shifts < n)]
            if len(shifts):
                break
        video.append(video_windows(clip.per_frame, np.array([v])))
        audio.append(torch.from_numpy(mfcc_windows(clip.cep, np.array([v, v + int(rng.choice(shifts))]))))
    return torch.cat(video), torch.stack(audio, dim=1)


def pair_distances(model: SyncNet, video: torch.Tensor, mfcc_pairs: torch.Tensor) -> torch.Tensor:
    """``(2, B)`` distances of each video window to its in-sync [0] and shifted [1] audio window;
    the video stream runs once per window."""
    v = model.embed_video(video.to(model.device))  # (B, D)
    a = model.embed_audio(mfcc_pairs.flatten(0, 1).to(model.device)).unflatten(0, mfcc_pairs.shape[:2])  # (2, B, D)
    return torch.linalg.vector_norm(a - v[None], dim=-1)


def contrastive_loss(dist: torch.Tensor, label: torch.Tensor, margin: float) -> torch.Tensor:
    """Chung & Zisserman Eq. 1: ``mean(y d^2 + (1 - y) max(margin - d, 0)^2) / 2``."""
    return 0.5 * (label * dist.square() + (1 - label) * F.relu(margin - dist).square()).mean()


def split_holdout(clips: Sequence[SyncClip], fraction: float, seed: int) -> tuple[list[SyncClip], list[SyncClip]]:
    """Hold out whole groups (sources) until ``fraction`` of the clips is held out; at least one
    group is always trained on. With a single group, clips are held out individually."""
    if fraction <= 0 or len(clips) < 2:
        return list(clips), []
    rng = np.random.default_rng(seed)
    groups = sorted({c.group for c in clips})
    if len(groups) == 1:
        order = rng.permutation(len(clips))
        n_hold = min(max(1, round(fraction * len(clips))), len(clips) - 1)
        hold = set(order[:n_hold].tolist())
        return [c for i, c in enumerate(clips) if i not in hold], [c for i, c in enumerate(clips) if i in hold]
    held: set[str] = set()
    target = fraction * len(clips)
    n_held = 0
    for g in rng.permutation(groups):
        if n_held >= target or len(held) == len(groups) - 1:
            break
        held.add(g)
        n_held += sum(c.group == g for c in clips)
    return [c for c in clips if c.group not in held], [c for c in clips if c.group in held]


@torch.no_grad()
def evaluate_pairs(model: SyncNet, clips: Sequence[SyncClip], params: SyncNetParams, seed: int,
                   pairs_per_clip: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Distances and labels of in-sync / shifted window pairs drawn from ``clips``."""
    rng = np.random.default_rng(seed)
    dists, labels = [], []
    model.eval()
    for clip in clips:
        if clip.n_windows <= params.min_shift:
            continue
        video, audio = sample_pairs([clip], pairs_per_clip, params.min_shift, params.max_offset, rng)
        dists.append(pair_distances(model, video, audio).flatten().cpu().numpy())
        labels.append(np.repeat([1.0, 0.0], pairs_per_clip))
    if not dists:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(dists), np.concatenate(labels)


def best_threshold(dist: np.ndarray, label: np.ndarray) -> float:
    """Distance threshold (``in sync`` when below) with the best accuracy on these pairs."""
    cands = np.unique(dist)
    acc = [((dist <= t) == (label > 0.5)).mean() for t in cands]
    return float(cands[int(np.argmax(acc))])


@torch.no_grad()
def evaluate_offsets(model, clips: Sequence[SyncClip], max_offset: int) -> list[dict]:
    """The standard offset search on every clip: found offset and Sync-C / Sync-D."""
    model.eval()
    rows = []
    for clip in clips:
        if clip.n_windows < 1:
            continue
        video_emb, audio_emb = embed_clip(model, clip.per_frame, clip.cep)
        res = av_offset(video_emb, audio_emb, max_offset)
        rows.append({"clip_id": clip.clip_id, "planted_shift_s": clip.planted_shift_s, "av_offset": res.offset,
                     "sync_conf": res.conf, "sync_dist": res.min_dist})
    return rows


def heldout_metrics(model, train: Sequence[SyncClip], held: Sequence[SyncClip], params: SyncNetParams,
                    seed: int) -> dict:
    """Pair AUC / accuracy (threshold picked on training pairs) and offset recovery on ``held``."""
    out: dict = {}
    d_tr, y_tr = evaluate_pairs(model, train, params, seed + 1)
    threshold = best_threshold(d_tr, y_tr) if len(d_tr) else params.margin / 2
    out["pair_threshold"] = threshold
    if len(d_tr):
        out["train_pair_auc"] = float(roc_auc_score(y_tr, -d_tr))
    clean = [c for c in held if c.planted_shift_s == 0]
    d_ho, y_ho = evaluate_pairs(model, clean, params, seed + 2)
    if len(d_ho) and len(set(y_ho)) == 2:
        out["heldout_pair_auc"] = float(roc_auc_score(y_ho, -d_ho))
        out["heldout_pair_accuracy"] = float(((d_ho <= threshold) == (y_ho > 0.5)).mean())
        out["heldout_pairs"] = int(len(d_ho))
    offsets = evaluate_offsets(model, held, params.max_offset)
    clean_rows = [r for r in offsets if r["planted_shift_s"] == 0]
    if clean_rows:
        out["heldout_clean_clips"] = len(clean_rows)
        out["heldout_offset_within_1"] = float(np.mean([abs(r["av_offset"]) <= 1 for r in clean_rows]))
        out["heldout_median_sync_conf"] = float(np.median([r["sync_conf"] for r in clean_rows]))
        out["heldout_median_sync_dist"] = float(np.median([r["sync_dist"] for r in clean_rows]))
    out["heldout_offsets"] = offsets
    return out


def train_syncnet(model: SyncNet, clips: Sequence[SyncClip], params: SyncNetParams, seed: int = 0,
                  log: Callable[[int, float], None] | None = None) -> tuple[SyncNet, dict]:
    """Train ``model`` (``new_syncnet(params)``) on ``clips``; return it (eval mode) and its metrics."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, held = split_holdout(clips, params.holdout_fraction, seed)
    train = [c for c in train if c.n_windows > params.min_shift]
    if not train:
        raise ValueError("syncnet_train: no clip long enough to train on "
                         f"(needs > {params.min_shift + 4} frames with audio)")
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params.lr, total_steps=params.train_steps, pct_start=0.1)
    started = time.perf_counter()
    model.train()
    loop = StepLoop(model.parameters(), opt, params.train_steps, scheduler=sched, desc="syncnet_train")
    for step in loop:
        video, audio = sample_pairs(train, params.batch_size, params.min_shift, params.max_offset, rng)
        dist = pair_distances(model, video, audio)  # (2, B): in sync, shifted
        loop.step(contrastive_loss(dist, torch.tensor([[1.0], [0.0]], device=dist.device), params.margin))
        if (step - 1) % 20 == 0 or step == params.train_steps:
            loop.show(loss=f"{loop.mean_loss(20):.4f}")
            if log is not None:
                log(step - 1, loop.mean_loss(20))
    train_seconds = time.perf_counter() - started
    model.eval()
    metrics = {
        "backend": "syncnet_trained",
        "steps": params.train_steps,
        "train_seconds": train_seconds,
        "final_loss": loop.mean_loss(20),
        "train_clips": len(train),
        "train_windows": int(sum(c.n_windows for c in train)),
        "heldout_clips": len(held),
        "planted_out_of_sync_in_train": int(sum(c.planted_shift_s != 0 for c in train)),
        "planted_out_of_sync_in_heldout": int(sum(c.planted_shift_s != 0 for c in held)),
        "clip_use": {**{c.clip_id: "trained" for c in train}, **{c.clip_id: "held_out" for c in held}},
    }
    metrics.update(heldout_metrics(model, train, held, params, seed))
    return model, metrics


# ------------------------------------------------------------------------------- the stage
def planted_shifts(clips: pd.DataFrame, manifest: pd.DataFrame | None) -> np.ndarray:
    """Per clip, the ground-truth audio shift (s) of planted out-of-sync sample videos, joined on
    ``file`` from the sample manifest: 0 for clean clips, NaN for a planted clip (``kind == "av_shift"``)
    whose shift the manifest does not state."""
    if manifest is None or "file" not in manifest.columns or "file" not in clips.columns:
        return np.zeros(len(clips))
    shift = pd.to_numeric(manifest.get("audio_shift_s", pd.Series(0.0, index=manifest.index)), errors="coerce")
    shift = shift.fillna(0.0).to_numpy(float)
    planted = shift != 0
    if "kind" in manifest.columns:
        planted |= manifest["kind"].astype(str).eq("av_shift").to_numpy()
    value = np.where(planted, np.where(shift != 0, shift, np.nan), 0.0)
    by_file = dict(zip(manifest["file"].astype(str), value))
    return np.array([by_file.get(f, 0.0) for f in clips["file"].astype(str)], float)


METRIC, CROSS_FIT = "metric", "cross_fit"


def syncnet_folds(clips: pd.DataFrame, params: Params) -> pd.DataFrame:
    """``clips`` with ``group``, ``role`` (the split's, ``mcdm.data.split.clip_roles``) and ``fold``:
    ``metric`` for the training split's clips, ``cross_fit`` for the rest (module docstring)."""
    roled = clip_roles(clips, params)
    roled["fold"] = np.where(roled["role"] == TRAIN, METRIC, CROSS_FIT)
    return roled


def _train_fold(usable: list[SyncClip], params: Params) -> tuple[SyncNet | None, dict]:
    """One fold's SyncNet and metrics (None and a reason when the fold has no clip long enough)."""
    torch.manual_seed(params.seed)
    try:
        return train_syncnet(new_syncnet(params.data.syncnet), usable, params.data.syncnet, seed=params.seed)
    except ValueError as err:
        return None, {"backend": "syncnet_trained", "not_trained": str(err), "clip_use": {}}


def _save_models(models: dict, out_dir: Path, metrics: dict, table: pd.DataFrame, offsets: pd.DataFrame) -> None:
    """The whole folder written under a temporary name, then renamed."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    models[METRIC].save_pretrained(tmp, safe_serialization=True)
    if models.get(CROSS_FIT) is not None:
        models[CROSS_FIT].save_pretrained(tmp / CROSS_FIT_DIR, safe_serialization=True)
    write_json(metrics, tmp / "metrics.json")
    write_csv(table, tmp / FOLD_TABLE)
    write_csv(offsets, tmp / "heldout_offsets.csv")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def run_syncnet_train(clips_path: str | os.PathLike, out_dir: str | os.PathLike, params: Params,
                      manifest_path: str | os.PathLike | None = None) -> dict:
    """The ``syncnet_train`` stage: train the two folds' SyncNets (module docstring) on the
    face-filtered clips, or convert the official weights given by ``data.syncnet.weights`` (never
    trained here: one network for everything); save ``save_pretrained`` (+ ``cross_fit/``),
    ``metrics.json``, ``training_clips.csv`` and ``heldout_offsets.csv``."""
    sp = params.data.syncnet
    clips = read_table(clips_path, "quality")
    if len(clips) == 0:
        raise McdmError(f"syncnet_train: {clips_path} has no clips")
    manifest = None
    if manifest_path is not None and Path(manifest_path).is_file():
        manifest = pd.read_csv(manifest_path, dtype={"file": str}, keep_default_na=False)
    clips = syncnet_folds(clips.assign(planted_shift_s=planted_shifts(clips, manifest)), params)
    out_dir = Path(out_dir)
    models: dict[str, object] = {}
    use = {}
    if sp.weights:  # official SyncNet: convert to our folder format, score every clip, no training
        model = load_syncnet(sp.weights)
        rows, skipped = [], []
        for row in tqdm(clips.to_dict("records"), desc="syncnet (official) check", unit="clip"):
            try:
                res = sync_scores(*read_sync_clip(row["crop_path"]), model=model, max_offset=sp.max_offset)
            except (MediaError, ValueError) as err:
                skipped.append((row["clip_id"], str(err)))
                continue
            rows.append({"clip_id": row["clip_id"], "planted_shift_s": row["planted_shift_s"], **res})
        clean = [r for r in rows if r["planted_shift_s"] == 0]
        metrics = {"backend": "syncnet_official", "weights": str(sp.weights), "clips_scored": len(rows),
                   "clean_offset_within_1": float(np.mean([abs(r["av_offset"]) <= 1 for r in clean])) if clean else None,
                   "clean_median_sync_conf": float(np.median([r["sync_conf"] for r in clean])) if clean else None}
        offsets, models[METRIC] = rows, model
        use = {i: "official weights (not trained here)" for i in clips["clip_id"]}
    else:
        mouth_size = (sp.mouth_height, sp.mouth_width)
        loaded = map_videos(partial(load_clip, mouth_size=mouth_size), clips.to_dict("records"),
                            workers=params.data.workers, address=params.data.dask_address, desc="syncnet inputs",
                            cost=lambda r: float(r.get("n_frames") or 0))
        usable = {r["clip_id"]: c for r, c in zip(clips.to_dict("records"), loaded) if isinstance(c, SyncClip)}
        skipped = [(r["clip_id"], c.reason) for r, c in zip(clips.to_dict("records"), loaded) if isinstance(c, Crashed)]
        if not usable:
            raise McdmError(f"syncnet_train: none of the {len(clips)} clips could be read ({skipped[:1]})")
        fold_metrics = {}
        for fold in (METRIC, CROSS_FIT):
            ids = clips.loc[clips["fold"] == fold, "clip_id"]
            models[fold], fold_metrics[fold] = _train_fold([usable[i] for i in ids if i in usable], params)
            use.update(fold_metrics[fold].pop("clip_use"))
        if models[METRIC] is None:
            raise McdmError(f"syncnet_train: the metric fold (training-split identities only) has no usable clip: "
                            f"{fold_metrics[METRIC]['not_trained']}")
        metrics = fold_metrics[METRIC]
        offsets = metrics.pop("heldout_offsets")
        cross = fold_metrics[CROSS_FIT]
        cross.pop("heldout_offsets", None)
        metrics["cross_fit"] = cross
    for clip_id, reason in skipped:  # unreadable clips: the sync_filter stage records them as rejects
        print(f"syncnet_train: skipped clip {clip_id}: {reason}", file=sys.stderr)
    table = clips[["clip_id", "group", "role", "fold", "planted_shift_s"]].assign(
        use=[use.get(i, "unusable") for i in clips["clip_id"]])
    metrics["skipped_clips"] = len(skipped)
    metrics["planted_out_of_sync_in_table"] = int((clips["planted_shift_s"] != 0).sum())
    metrics["folds"] = {fold: {"clips": int((table["fold"] == fold).sum()),
                               "trained": int(((table["fold"] == fold) & (table["use"] == "trained")).sum()),
                               "groups": int(table.loc[table["fold"] == fold, "group"].nunique())}
                        for fold in (METRIC, CROSS_FIT)}
    metrics["manifest"] = str(manifest_path) if manifest is not None else None
    _save_models(models, out_dir, metrics, table, pd.DataFrame(offsets))
    return metrics
