"""Training clips cut from the ``features`` stage's files (what the three MCDM stages read).

A *video* is one ``data/features/<clip_id>.safetensors`` of the training split (T frames). A training
*sample* is a run of K consecutive present clips of F = ``model.clip_frames`` frames starting at
frame s (K = 1 in stages 1-2, K = ``train.stage3.clips_per_run`` in stage 3, decisions.md #6)::

    reference            frame 0 of the video (its latent and identity embedding)
    present clip k       frames [s + kF, s + (k+1)F)                       k = 0 .. K-1
    archived clip k      the a = model.archived_frames frames just before it, [s + kF - a, s + kF);
                         where the video has fewer, the missing ones are the reference (as at
                         inference, where the first archived clip is the reference repeated a times)

Starts s run over every video with a stride of F / 2 (at least 1) while s + KF <= T. An item is a
dict of tensors with a leading run axis K::

    latents           (K, C, F, h, w)   present clips, VAE latents (the model's video layout)
    archived_latents  (K, a, C, h, w)
    ref_latent        (C, h, w)
    ref_embedding     (E,)              identity embedding of the reference (present-clip prior)
    audio             (K, F, A)         audio features per frame
    landmark_images   (K, F, 1, S, S)   rendered landmark heat maps (landmark guider input), S = crop side
    head, lip, expression  (K, F, d)    motion tokens of the frozen motion encoders (when asked for)

Per-frame arrays are read from the memory-mapped files per item (only the frames of the item), so
the training set never has to fit in memory; the motion tokens (a few numbers per frame) are computed
once per video and kept.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
import torch
from einops import rearrange
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mcdm.errors import McdmError, MissingStageOutput
from mcdm.face.heatmaps import render_landmark_heatmaps

FEATURES_STAGE = "features"
# feature-file arrays the stages read (``frames`` and ``waveform`` stay on disk)
PER_FRAME_KEYS = ("latents", "audio", "landmarks")
TOKEN_KEYS = ("head_pose", "mouth_crops", "landmarks")
MOTION_TOKENS = ("head", "lip", "expression")
STATISTICS_FRAMES = 100_000  # most audio frames read to fit condition statistics


@dataclass
class VideoFeatures:
    """One training video: its file, length, reference, and (optionally) motion tokens."""

    clip_id: str
    path: Path
    n_frames: int
    ref_latent: torch.Tensor  # (C, h, w) frame 0
    ref_embedding: torch.Tensor  # (E,)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # head / lip / expression (T, d)

    def read(self, keys, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Frames [start, stop) of the per-frame arrays ``keys`` (memory-mapped, nothing else read)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_slice(k)[start:stop].float() for k in keys}


@dataclass
class FeatureSet:
    """The training videos and the features stage's ``meta.json``."""

    videos: list[VideoFeatures]
    meta: dict
    index_path: Path
    latent_shape: tuple[int, int, int]
    audio_dim: int

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def ref_dim(self) -> int:
        return int(self.videos[0].ref_embedding.shape[0])

    def fingerprint(self) -> str:
        """Hash of the index and meta files (what a checkpoint of this data must match)."""
        import hashlib

        digest = hashlib.sha256(self.index_path.read_bytes())
        digest.update(json.dumps(self.meta, sort_keys=True).encode())
        return digest.hexdigest()[:16]


def _check_file(path: Path, keys, index_path: Path) -> tuple[int, dict]:
    """(T, shapes) of a feature file holding ``keys`` with one length T; one-line errors otherwise."""
    from safetensors import safe_open

    if not path.is_file():
        raise McdmError(f"{path}: listed in {index_path.name} but missing (run `dvc repro {FEATURES_STAGE}`)")
    with safe_open(str(path), framework="pt") as f:
        missing = [k for k in keys if k not in f.keys()]
        if missing:
            raise McdmError(f"{path}: lacks {', '.join(missing)} (run `dvc repro {FEATURES_STAGE}`)")
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    lengths = {k: s[0] for k, s in shapes.items() if k != "ref_embedding"}
    if len(set(lengths.values())) != 1:
        raise McdmError(f"{path}: per-frame arrays disagree in length {lengths}")
    return next(iter(lengths.values())), shapes


def load_feature_set(features_dir: str | Path, split: str = "train", motion_encoders=None,
                     show_progress: bool = True) -> FeatureSet:
    """The ``split`` videos listed in ``<features_dir>/index.parquet``; with ``motion_encoders``
    (:class:`~mcdm.models.encoders.MotionEncoders`) their per-frame motion tokens are computed once."""
    from safetensors import safe_open

    features_dir = Path(features_dir)
    index_path = features_dir / "index.parquet"
    if not index_path.is_file():
        raise MissingStageOutput(index_path, FEATURES_STAGE)
    meta_path = features_dir / "meta.json"
    if not meta_path.is_file():
        raise MissingStageOutput(meta_path, FEATURES_STAGE)
    meta = json.loads(meta_path.read_text())
    if "resolution" not in meta:
        raise McdmError(f"{meta_path}: no resolution (run `dvc repro {FEATURES_STAGE}`)")
    index = pd.read_parquet(index_path)
    if "clip_id" not in index.columns:
        raise McdmError(f"{index_path}: no clip_id column")
    if "split" in index.columns:
        index = index[index["split"] == split]
    if index.empty:
        raise McdmError(f"{index_path}: no {split} clips to train on")
    keys = tuple(dict.fromkeys(PER_FRAME_KEYS + ("ref_embedding",) + (TOKEN_KEYS if motion_encoders else ())))
    videos, latent_shapes, audio_dims = [], set(), set()
    for clip_id in tqdm(index["clip_id"].astype(str), desc="load features", leave=False, disable=not show_progress):
        path = features_dir / f"{clip_id}.safetensors"
        n_frames, shapes = _check_file(path, keys, index_path)
        latent_shapes.add(shapes["latents"][1:])
        audio_dims.add(shapes["audio"][1])
        with safe_open(str(path), framework="pt") as f:
            ref_latent = f.get_slice("latents")[0:1].float()[0]
            ref_embedding = f.get_tensor("ref_embedding").float()
            tokens = {}
            if motion_encoders is not None:  # the whole video once; only the tokens are kept
                tokens = {k: v.float().cpu() for k, v in motion_encoders.tokens({k: f.get_tensor(k) for k in TOKEN_KEYS}).items()}
        videos.append(VideoFeatures(clip_id, path, int(n_frames), ref_latent, ref_embedding, tokens))
    if len(latent_shapes) != 1 or len(audio_dims) != 1:
        raise McdmError(f"{features_dir}: videos differ in latent shape {sorted(latent_shapes)} or audio width "
                        f"{sorted(audio_dims)} (re-run `dvc repro {FEATURES_STAGE}`)")
    return FeatureSet(videos=videos, meta=meta, index_path=index_path, latent_shape=tuple(latent_shapes.pop()),
                      audio_dim=int(audio_dims.pop()))


def clip_starts(n_frames: int, clip_frames: int, clips_per_run: int, stride: Optional[int] = None) -> list[int]:
    """First frames s of the runs of ``clips_per_run`` clips of ``clip_frames`` frames inside a video."""
    stride = stride or max(1, clip_frames // 2)
    return list(range(0, n_frames - clips_per_run * clip_frames + 1, stride))


def archived_indices(start: int, archived_frames: int) -> torch.Tensor:
    """Frame indices of the archived clip before a present clip starting at ``start``; -1 = the
    reference (the history is shorter than ``archived_frames``)."""
    idx = torch.arange(start - archived_frames, start)
    return torch.where(idx < 0, torch.full_like(idx, -1), idx)


class ClipRuns(Dataset):
    """Runs of K consecutive present clips with their archived clips (see the module docstring)."""

    def __init__(self, features: FeatureSet, clip_frames: int, archived_frames: int, clips_per_run: int = 1,
                 stride: Optional[int] = None, with_tokens: bool = False):
        self.features = features
        self.clip_frames = clip_frames
        self.archived_frames = archived_frames
        self.clips_per_run = clips_per_run
        self.with_tokens = with_tokens
        need = clips_per_run * clip_frames
        self.items = [(v, s) for v, video in enumerate(features.videos)
                      for s in clip_starts(video.n_frames, clip_frames, clips_per_run, stride)]
        if not self.items:
            longest = max(v.n_frames for v in features.videos)
            raise McdmError(f"no training video has the {need} frames a sample needs "
                            f"({clips_per_run} clip(s) x model.clip_frames={clip_frames}); the longest has {longest}")
        if with_tokens and not features.videos[0].tokens:
            raise McdmError("motion tokens asked for, but the features were loaded without motion encoders")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        v, start = self.items[i]
        video = self.features.videos[v]
        f, k, a = self.clip_frames, self.clips_per_run, self.archived_frames
        # one read covers the archived frames of the first clip through the end of the run
        first = max(0, start - a)
        arrays = video.read(PER_FRAME_KEYS, first, start + k * f)
        present = torch.arange(start, start + k * f) - first  # (K F,) rows of the read
        # archived clips: the a frames before each present clip, the reference where there are none
        arch_idx = torch.stack([archived_indices(start + j * f, a) for j in range(k)])  # (K, a) video frames
        rows = (arch_idx - first).clamp(min=0)
        archived = torch.where((arch_idx >= 0)[..., None, None, None], arrays["latents"][rows], video.ref_latent)
        item = {
            "latents": rearrange(arrays["latents"][present], "(k f) c h w -> k c f h w", k=k),
            "archived_latents": archived,
            "ref_latent": video.ref_latent,
            "ref_embedding": video.ref_embedding,
            "audio": rearrange(arrays["audio"][present], "(k f) a -> k f a", k=k),
            "landmark_images": rearrange(
                render_landmark_heatmaps(arrays["landmarks"][present], self.features.resolution),
                "(k f) 1 s t -> k f 1 s t", k=k),
        }
        if self.with_tokens:
            frames = torch.arange(start, start + k * f)
            for name in MOTION_TOKENS:
                item[name] = rearrange(video.tokens[name][frames], "(k f) d -> k f d", k=k)
        return item

    def sampled_items(self, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """A fixed batch of up to ``n`` items drawn with a private generator (the global RNG is untouched)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        items = [self[i] for i in order]
        return {key: torch.stack([it[key] for it in items]) for key in items[0]}

    def fixed_items(self, n: int) -> dict[str, torch.Tensor]:
        """A deterministic batch for pictures: the first run of up to ``n`` different videos."""
        picks, seen = [], set()
        for i, (v, _) in enumerate(self.items):
            if v not in seen:
                seen.add(v)
                picks.append(i)
            if len(picks) == n:
                break
        items = [self[i] for i in picks]
        return {key: torch.stack([it[key] for it in items]) for key in items[0]}


def audio_frames(features: FeatureSet, limit: int = STATISTICS_FRAMES) -> torch.Tensor:
    """Training frames' audio features (N, A), at most ``limit`` frames evenly taken from every video
    (what the per-channel condition statistics are fitted on)."""
    total = sum(v.n_frames for v in features.videos)
    every = max(1, -(-total // limit))
    return torch.cat([v.read(("audio",), 0, v.n_frames)["audio"][::every] for v in features.videos])


def ref_embeddings(features: FeatureSet) -> torch.Tensor:
    """(M, E) identity embeddings of the training videos' references."""
    return torch.stack([v.ref_embedding for v in features.videos])
