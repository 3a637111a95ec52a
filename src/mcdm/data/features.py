"""features: everything training and evaluation read per clip, so no later stage decodes video again.

Per clip of ``data/split/{train,test,open_set}.parquet`` the crop mp4 (frames + audio) is decoded
ONCE and ``<out>/<clip_id>.safetensors`` holds (T = video frames at ``data.fps``):
====================  =================  ======================================================
``frames``            (T, 3, S, S) u8    the square face crops (metrics, SyncNet, pictures)
``latents``           (T, C, h, w) f32   VAE posterior mean x ``scaling_factor`` (SD convention)
``audio``             (T, A) f32         audio features per video frame (``wav2vec2`` | ``logmel``)
``waveform``          (N,) f32           the clip's audio, 16 kHz mono, N = T / fps * 16000
``ref_embedding``     (E,) f32           identity embedding of the reference frame, frame 0
                                         (``clip`` | ``dlib+vae``)
``landmarks``         (T, 68, 2) f32     68 landmarks in crop pixels (from the faces stage)
``detected``          (T,) u8            1 where the landmarks come from a real detection
``head_pose``         (T, 6) f32         pitch, yaw, roll, tx, ty, tz fitted to the landmarks
``expression``        (T, 136) f32       pose-normalised landmark offsets (expression input)
``mouth_crops``       (T, 32, 48) u8     grayscale mouth crops (lip encoder, SyncNet)
====================  =================  ======================================================

Feature computations come from :mod:`mcdm.models.encoders` (one implementation for training and
inference); the VAE and the audio / identity backends from ``models/base`` through
:mod:`mcdm.media.layout`. Beside the files: ``index.parquet`` (the split tables' columns plus
``split, path, n_frames``), ``meta.json`` (backends, dims, fps), ``rejects.csv`` and ``summary.json``.
Clips are mapped with :func:`mcdm.data.parallel.map_videos` (decisions.md #9): in this process on
``base_models.threads`` torch threads, or on the Dask scheduler of ``data.dask_address`` when one is
given (each worker process loads the models once).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mcdm.config import Params
from mcdm.data.parallel import Crashed, map_videos, stage_workers
from mcdm.data.rejects import finish_stage, reject_row
from mcdm.errors import McdmError
from mcdm.face.geometry import expression_offsets, head_pose_from_landmarks
from mcdm.face.mouth import mouth_boxes, mouth_crop
from mcdm.media.files import read_table, write_json
from mcdm.media.io import MediaError, read_audio, read_frames
from mcdm.media.layout import VAE, base_path, frozen_encoder_paths, read_encoders
from mcdm.models.frozen import FrozenEncoders, load_frozen_encoders
from mcdm.models.vae import encode_latents, load_vae

STAGE = "features"
SPLITS = ("train", "test", "open_set")
MAX_LENGTH_MISMATCH = 2  # frames: crop video vs landmark track


@dataclass(frozen=True)
class FeatureJob:
    """What a worker needs to make one clip's features (picklable)."""

    models_dir: str
    out_dir: str
    fps: float
    audio_rate: int
    resolution: int
    threads: int
    device: str = "cpu"


# ------------------------------------------------------------------------------ per process models
_MODELS: dict[tuple[int, str], FrozenEncoders] = {}


def _models(job: FeatureJob) -> FrozenEncoders:
    """VAE + audio + identity encoders, loaded once per process (Dask workers keep them)."""
    key = (os.getpid(), job.models_dir)
    if key not in _MODELS:
        torch.set_num_threads(job.threads)
        _MODELS.clear()
        _MODELS[key] = load_frozen_encoders(**frozen_encoder_paths(job.models_dir), device=job.device)
    return _MODELS[key]


# ---------------------------------------------------------------------------------- one clip
def load_landmarks(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(landmarks (T, 68, 2) f32, detected (T,) bool)`` from a faces-stage npz."""
    with np.load(path) as npz:
        if "landmarks" not in npz:
            raise McdmError(f"{path}: no 'landmarks' array")
        lm = np.asarray(npz["landmarks"], np.float32)
        detected = np.asarray(npz["detected"], bool) if "detected" in npz else np.ones(len(lm), bool)
    if lm.ndim != 3 or lm.shape[1:] != (68, 2):
        raise McdmError(f"{path}: landmarks have shape {lm.shape}, expected (T, 68, 2)")
    return lm, detected


def clip_features(row: dict, job: FeatureJob) -> dict:
    """Compute one clip's features and write ``<out>/<clip_id>.safetensors``; returns its index row.

    Raises ``McdmError`` / ``MediaError`` with a one-line reason for a clip that cannot be used.
    """
    import torch
    from safetensors.torch import save_file


    models = _models(job)
    clip_id = str(row["clip_id"])
    # 1. decode the crop once: frames at data.fps and 16 kHz mono audio
    frames = read_frames(row["crop_path"], fps=job.fps)
    if frames.shape[1:3] != (job.resolution, job.resolution):
        raise McdmError(f"crop is {frames.shape[2]}x{frames.shape[1]}, expected data.resolution={job.resolution}")
    audio = read_audio(row["crop_path"], rate=job.audio_rate)
    landmarks, detected = load_landmarks(row["landmarks_path"])
    if abs(len(frames) - len(landmarks)) > MAX_LENGTH_MISMATCH:
        raise McdmError(f"length_mismatch: {len(frames)} video frames vs {len(landmarks)} landmark frames")
    t = min(len(frames), len(landmarks))
    frames, landmarks, detected = frames[:t], landmarks[:t], detected[:t]
    n_samples = int(round(t / job.fps * job.audio_rate))
    waveform = np.pad(audio[:n_samples], (0, max(0, n_samples - len(audio)))).astype(np.float32)

    # 2. latents, audio features, reference identity
    latents = encode_latents(models.vae, frames)
    audio_feats = np.asarray(models.audio(waveform, job.fps, n_frames=t), np.float32)
    ref_embedding = np.asarray(models.identity(frames[0], landmarks[0]), np.float32)

    # 3. geometry: head pose, expression offsets, mouth crops (temporally smoothed mouth boxes)
    head_pose = head_pose_from_landmarks(landmarks, job.resolution)
    expression = expression_offsets(landmarks).astype(np.float32)
    boxes = mouth_boxes(landmarks)
    mouths = np.stack([mouth_crop(f, box=b) for f, b in zip(frames, boxes)])

    arrays = {
        "frames": frames.transpose(0, 3, 1, 2),  # (T, 3, S, S)
        "latents": latents.float().numpy(),
        "audio": audio_feats,
        "waveform": waveform,
        "ref_embedding": ref_embedding,
        "landmarks": landmarks.astype(np.float32),
        "detected": detected.astype(np.uint8),
        "head_pose": np.asarray(head_pose, np.float32),
        "expression": expression,
        "mouth_crops": np.asarray(mouths, np.uint8),
    }
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise McdmError(f"non_finite: {', '.join(bad)}")
    path = Path(job.out_dir) / f"{clip_id}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"clip_id": clip_id, "fps": str(job.fps), "audio_backend": models.audio.name,
                                           "image_backend": models.identity.name})
    os.replace(tmp, path)
    return {"path": str(path), "n_frames": t, "audio_dim": int(audio_feats.shape[1]),
            "embed_dim": int(ref_embedding.shape[0]), "expression_dim": int(expression.shape[1])}


def _guarded_clip(row: dict, job: FeatureJob) -> dict:
    """``clip_features`` with the expected failures turned into a reject reason."""

    try:
        return {"ok": clip_features(row, job)}
    except (McdmError, MediaError, OSError) as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        code = text.split(":", 1)[0] if text.split(":", 1)[0] in ("length_mismatch", "non_finite") else "unusable_clip"
        detail = text.split(":", 1)[1].strip() if code != "unusable_clip" else text
        return {"reject": (code, detail[:200])}


# ------------------------------------------------------------------------------------- stage
def read_split_tables(split_dir: str | os.PathLike) -> pd.DataFrame:
    """The three split tables stacked, with a ``split`` column; each clip once."""

    frames = []
    for name in SPLITS:
        df = read_table(Path(split_dir) / f"{name}.parquet", "split")
        if len(df):
            frames.append(df.assign(split=name))
    if not frames:
        raise McdmError(f"{split_dir}: the split tables hold no clips")
    table = pd.concat(frames, ignore_index=True)
    missing = [c for c in ("clip_id", "crop_path", "landmarks_path") if c not in table]
    if missing:
        raise McdmError(f"{split_dir}: split tables lack columns {', '.join(missing)}")
    dup = table["clip_id"][table["clip_id"].duplicated()]
    if len(dup):
        raise McdmError(f"{split_dir}: clip {dup.iloc[0]} is in more than one split table")
    return table


def features(split_dir: str | os.PathLike, models_dir: str | os.PathLike, out_dir: str | os.PathLike,
             params: Params) -> tuple[pd.DataFrame, object]:
    """Run the stage; returns ``(index, StageSummary)``."""
    started = time.perf_counter()
    table = read_split_tables(split_dir)
    manifest = read_encoders(models_dir)
    vae = load_vae(base_path(models_dir, VAE))  # fail here, once, when the base models are unusable
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the work is torch (the VAE encoder on base_models.threads intra-op threads): in-process unless a
    # Dask scheduler is given (stage_workers)
    address = params.data.dask_address
    workers = stage_workers(params.data.workers, address, multithreaded=True)
    in_process = not address  # stage_workers gave 1 worker
    job = FeatureJob(models_dir=str(models_dir), out_dir=str(out_dir), fps=params.data.fps,
                     audio_rate=params.data.audio_rate, resolution=params.data.resolution,
                     threads=params.base_models.threads if in_process else 1,
                     device="cuda" if in_process and torch.cuda.is_available() else "cpu")
    rows = table.to_dict("records")
    results = map_videos(partial(_guarded_clip, job=job), rows, workers=workers, address=address,
                         desc="features", cost=lambda r: float(r.get("n_frames") or 0),
                         timeout=params.data.item_timeout_seconds)

    kept, rejects = [], []
    for row, res in zip(rows, results):
        file = str(row.get("file", row["crop_path"]))
        if isinstance(res, Crashed):
            rejects.append(reject_row(file, STAGE, res.code, res.reason, clip_id=row["clip_id"]))
        elif "reject" in res:
            rejects.append(reject_row(file, STAGE, res["reject"][0], res["reject"][1], clip_id=row["clip_id"]))
        else:
            kept.append({**row, **res["ok"]})
    index = pd.DataFrame(kept)
    if len(index):
        first = ["clip_id", "split", "source_id", "video_id", "n_frames", "path"]
        index = index[[c for c in first if c in index] + [c for c in index if c not in first]]
        if "long_term" not in index:
            index["long_term"] = False
        index["long_term"] = index["long_term"].fillna(False).astype(bool)
    keep_names = {f"{c}.safetensors" for c in index.get("clip_id", [])}
    for stale in out_dir.glob("*.safetensors"):  # files of clips no longer in the split
        if stale.name not in keep_names:
            stale.unlink()

    c, s = int(vae.config.latent_channels), params.data.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    meta = {
        "fps": params.data.fps,
        "audio_rate": params.data.audio_rate,
        "resolution": params.data.resolution,
        "audio": {"backend": manifest["audio"]["backend"], "dim": manifest["audio"]["dim"]},
        "image": {"backend": manifest["image"]["backend"], "dim": manifest["image"]["dim"], "reference_frame": 0},
        "latents": {"shape": [c, s, s], "scaling_factor": float(vae.config.scaling_factor), "dtype": "float32"},
        "head_pose_dim": 6,
        "expression_dim": int(index["expression_dim"].iloc[0]) if len(index) else None,
        "mouth_crop": [32, 48],
        "clips": {name: int((index.get("split", pd.Series(dtype=str)) == name).sum()) for name in SPLITS},
        "parallel": "dask" if workers > 1 or address else "in-process loop",
    }
    write_json(meta, out_dir / "meta.json")
    seconds = float(index["n_frames"].sum()) / params.data.fps if len(index) else 0.0
    summary = finish_stage(STAGE, out_dir, "index", index, rejects, started, video_seconds=seconds,
                           workers=workers, extra={"clips": meta["clips"]})
    return index, summary
