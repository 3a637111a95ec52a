"""The training frames the base models are pretrained on (decisions.md #1: training split only).

Frames come from the square talking-head crops (``crop_path``) of ``data/split/train.parquet``,
evenly spaced within each clip so that at most ``max_frames`` are read in all. Whole clips are held
out (``heldout_fraction``, at least one) to measure the VAE's reconstruction PSNR and the UNet's
denoising loss on frames the fit never saw; with a single clip, its last frames are held out instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mcdm.data.rejects import reject_row
from mcdm.errors import McdmError
from mcdm.media.io import MediaError, read_frames


@dataclass
class FrameSet:
    """RGB uint8 frames ``(N, H, W, 3)`` and, per frame, the index of its clip (reference pairs)."""

    frames: np.ndarray
    clip_index: np.ndarray
    clip_ids: list[str]

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class TrainingFrames:
    fit: FrameSet
    heldout: FrameSet
    rejects: list[dict]


def _evenly(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


def read_clip_frames(path: str, fps: float, resolution: int, keep: int | None = None) -> np.ndarray:
    """Frames of one crop clip, at most ``keep`` of them evenly spaced; checks the crop size."""
    frames = read_frames(path, fps=fps)
    if frames.shape[1:3] != (resolution, resolution):
        raise McdmError(f"{path}: crop is {frames.shape[2]}x{frames.shape[1]}, expected data.resolution={resolution}")
    return frames if keep is None else frames[_evenly(len(frames), keep)]


def load_training_frames(
    train: pd.DataFrame,
    fps: float,
    resolution: int,
    max_frames: int,
    heldout_fraction: float,
    seed: int = 0,
) -> TrainingFrames:
    """Read the training crops once; split whole clips into fit / held-out (deterministic in ``seed``)."""
    if train.empty:
        raise McdmError("base_models: the training table holds no clips")
    per_clip = max(2, math.ceil(max_frames / len(train)))
    clips: list[tuple[str, np.ndarray]] = []
    rejects: list[dict] = []
    for row in tqdm(train.to_dict("records"), desc="base_models: read training crops", unit="clip"):
        try:
            clips.append((str(row["clip_id"]), read_clip_frames(row["crop_path"], fps, resolution, per_clip)))
        except (MediaError, McdmError, OSError) as err:
            rejects.append(reject_row(str(row.get("file", row["crop_path"])), "base_models", "unreadable_crop",
                                      str(err), clip_id=str(row["clip_id"])))
    if not clips:
        raise McdmError(f"base_models: none of the {len(train)} training crops could be read ({rejects[0]['reason']})")

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(clips))
    if len(clips) >= 2:
        n_held = min(len(clips) - 1, max(1, round(heldout_fraction * len(clips))))
        held = set(order[:n_held].tolist())
        parts = {"fit": [c for i, c in enumerate(clips) if i not in held], "heldout": [c for i, c in enumerate(clips) if i in held]}
    else:  # one clip: its tail is the held-out part
        cid, frames = clips[0]
        cut = max(1, min(len(frames) - 1, int(round(len(frames) * (1 - heldout_fraction)))))
        parts = {"fit": [(cid, frames[:cut])], "heldout": [(cid, frames[cut:])]}
    sets = {}
    for name, members in parts.items():
        sets[name] = FrameSet(
            frames=np.concatenate([f for _, f in members]),
            clip_index=np.concatenate([np.full(len(f), i) for i, (_, f) in enumerate(members)]),
            clip_ids=[c for c, _ in members],
        )
    return TrainingFrames(fit=sets["fit"], heldout=sets["heldout"], rejects=rejects)
