"""The test set of the evaluation: the feature index, the selected test clips (read lazily from
their feature files) and their generation, batched."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mcdm.config import Params
from mcdm.errors import McdmError, MissingStageOutput


# ---------------------------------------------------------------------------------------------- data
def read_index(features_dir: str | Path) -> pd.DataFrame:
    path = Path(features_dir) / "index.parquet"
    if not path.is_file():
        raise MissingStageOutput(path, "features")
    index = pd.read_parquet(path)
    missing = [c for c in ("clip_id", "split", "n_frames") if c not in index]
    if missing:
        raise McdmError(f"{path}: lacks columns {', '.join(missing)}")
    if "long_term" not in index:
        index["long_term"] = False
    index["long_term"] = index["long_term"].fillna(False).astype(bool)
    index["file"] = [_feature_file(features_dir, row) for row in index.to_dict("records")]
    return index


def _feature_file(features_dir: str | Path, row: dict) -> str:
    own = Path(features_dir) / f"{row['clip_id']}.safetensors"
    if own.is_file() or not row.get("path"):
        return str(own)
    return str(row["path"])


def select_test_clips(index: pd.DataFrame, max_clips: int) -> pd.DataFrame:
    """Test clips in a fixed order: regular clips by id, then the long ones; at most ``max_clips``."""
    test = index[index["split"] == "test"]
    if test.empty:
        raise McdmError("features: the test split holds no clip (see data/split/test.parquet)")
    return test.sort_values(["long_term", "clip_id"]).head(max_clips).reset_index(drop=True)


class ClipFeatures:
    """Lazy reader of one clip's feature file: frames are sliced from disk, never all loaded at once."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingStageOutput(path, "features")
        self.path = path
        self._file = safe_open(str(path), framework="pt")
        keys = set(self._file.keys())
        missing = {"frames", "waveform", "landmarks"} - keys
        if missing:
            raise McdmError(f"{path}: lacks {', '.join(sorted(missing))}")
        self.n_frames = int(self._file.get_slice("frames").get_shape()[0])

    def frames(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """(n, S, S, 3) uint8 ground-truth crops."""
        stop = self.n_frames if stop is None else min(stop, self.n_frames)
        chunk = self._file.get_slice("frames")[start:stop]
        return np.ascontiguousarray(chunk.permute(0, 2, 3, 1).numpy())

    def landmarks(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        return self._file.get_slice("landmarks")[start:stop].numpy().astype(np.float32)

    def waveform(self, n_frames: int, fps: float, rate: int) -> np.ndarray:
        """The audio of the first ``n_frames`` frames (16 kHz mono), padded with silence if short."""
        n = int(round(n_frames / fps * rate))
        wave = self._file.get_slice("waveform")[:n].numpy().astype(np.float32)
        return np.pad(wave, (0, max(0, n - len(wave))))


# ---------------------------------------------------------------------------------------------- the stage
def generate_batched(pipe, refs: list, ref_landmarks: list, audios: list, lengths: list[int], params: Params,
                     landmarks: Optional[list] = None, desc: str = "generating", progress: bool = True):
    """Generate one video per reference / audio, ``eval.batch_size`` at a time (similar lengths share
    a batch; a batch runs to its longest and each video is cut to its own length), with the generator
    seeded by ``seed``. ``landmarks``: per item (n_i, 68, 2) driving landmarks, the last repeated to
    fill a batch. Returns (videos, generation seconds per item), in input order."""
    p = params.eval
    videos, seconds = [None] * len(lengths), [0.0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    generator = torch.Generator().manual_seed(params.seed)
    bar = tqdm(total=sum(lengths), desc=desc, unit="frame", disable=not progress)
    for b in range(0, len(order), p.batch_size):
        batch = order[b:b + p.batch_size]
        n = max(lengths[i] for i in batch)
        lm = None
        if landmarks is not None:
            lm = np.stack([np.concatenate([landmarks[i], np.repeat(landmarks[i][-1:], n - lengths[i], 0)]) for i in batch])
        t0 = time.perf_counter()
        fake = pipe.generate_batch(np.stack([refs[i] for i in batch]), [audios[i] for i in batch], n,
                                   ref_landmarks=np.stack([ref_landmarks[i] for i in batch]), landmarks=lm,
                                   num_inference_steps=p.steps, generator=generator, progress=False)
        per_item = (time.perf_counter() - t0) / len(batch)
        for i, video in zip(batch, fake):
            videos[i], seconds[i] = video[: lengths[i]], per_item
        bar.update(sum(lengths[i] for i in batch))
    bar.close()
    return videos, seconds


def generate_test_set(pipe, clips: pd.DataFrame, params: Params, progress: bool = True) -> dict:
    """Generate every selected test clip; returns ids, real / fake videos, refs, audios, timing."""
    p, fps, rate = params.eval, params.data.fps, params.data.audio_rate
    limit = None if p.clip_seconds is None else max(1, int(round(p.clip_seconds * fps)))
    items = []
    for row in clips.to_dict("records"):
        clip = ClipFeatures(row["file"])
        n = clip.n_frames if limit is None else min(clip.n_frames, limit)
        items.append({"clip_id": row["clip_id"], "long_term": bool(row["long_term"]), "n": n,
                      "real": clip.frames(0, n), "landmarks": clip.landmarks(0, n),
                      "audio": clip.waveform(n, fps, rate)})
    lm = [it["landmarks"] for it in items] if p.use_landmarks else None
    started = time.perf_counter()
    videos, seconds = generate_batched(pipe, [it["real"][0] for it in items], [it["landmarks"][0] for it in items],
                                       [it["audio"] for it in items], [it["n"] for it in items], params,
                                       landmarks=lm, desc="generating test clips", progress=progress)
    for it, video, sec in zip(items, videos, seconds):
        it["fake"], it["gen_seconds"] = video, sec
    elapsed = time.perf_counter() - started
    frames = sum(it["n"] for it in items)
    return {"items": items, "seconds": elapsed, "frames": frames}
