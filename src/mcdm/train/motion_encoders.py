"""The ``motion_encoders`` stage (decisions.md #3): train the lip and expression encoders, fit the head-token
statistics, freeze and save them. Runs after ``features`` and before ``train_stage2``.

Objectives (stated, since the paper's supplement is unavailable):

- Lip encoder: audio-visual InfoNCE. An anchor is a window of ``lip_window`` mouth crops centred on
  frame t; its positive is the audio window centred on the same frame; its negatives are
  ``N_SHIFTS`` audio windows of the same clip shifted by a random offset s, MIN_SHIFT <= |s| <= MAX_SHIFT
  frames (random-shift negatives: they differ from the positive only in timing, so the encoder must
  read lip motion in sync with speech), plus the other anchors' positives in the batch.
      L_lip = -log( exp(<v, a_0> / tau) / sum_j exp(<v, a_j> / tau) ),  v, a unit vectors.
- Expression encoder: denoising autoencoder on pose-normalised landmark offsets
  (``expression_offsets``): x~ = x + sigma * std(x) * n with whole points dropped to the neutral
  (offset 0) with probability P_DROP_POINT; L_expr = || D(E(x~)) - x ||^2 / std(x)^2.
- Head tokens: no training; mean / std of the training clips' head poses.

Metrics (held-out clips, ``metrics.json``): lip sync accuracy (the true offset scores highest among
all offsets within +-MAX_SHIFT; chance 1 / (2 MAX_SHIFT + 1)), expression reconstruction R^2.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mcdm.config import Params
from mcdm.errors import McdmError, MissingStageOutput
from mcdm.face.geometry import expression_offsets
from mcdm.models.motion_encoders import ExpressionEncoder, HeadPoseEncoder, LipAudioEncoder, LipEncoder, MotionEncoders
from mcdm.train.steps import StepLoop

MIN_SHIFT, MAX_SHIFT, N_SHIFTS = 2, 15, 4
MIN_FRAMES = 2 * MIN_SHIFT + 1  # every centre of such a clip has a shifted window inside the clip
TEMPERATURE = 0.1
NOISE_SIGMA, P_DROP_POINT = 0.3, 0.1
REQUIRED_KEYS = ("audio", "mouth_crops", "landmarks", "head_pose")


@dataclass
class ClipFeatures:
    clip_id: str
    audio: torch.Tensor  # (T, A) float32
    mouths: torch.Tensor  # (T, 32, 48) uint8
    offsets: torch.Tensor  # (T, 136) float32
    head_pose: torch.Tensor  # (T, 6) float32

    @property
    def n_frames(self) -> int:
        return int(self.audio.shape[0])


def load_feature_clips(features_dir: str | Path, split: str = "train", show_progress: bool = True) -> list[ClipFeatures]:
    """The clips of ``split`` listed in ``<features_dir>/index.parquet`` (all rows when the index has no
    ``split`` column), each from ``<features_dir>/<clip_id>.safetensors``."""
    from safetensors.numpy import load_file

    features_dir = Path(features_dir)
    index_path = features_dir / "index.parquet"
    if not index_path.exists():
        raise MissingStageOutput(index_path, "features")
    index = pd.read_parquet(index_path)
    if "clip_id" not in index.columns:
        raise McdmError(f"{index_path}: no clip_id column")
    if "split" in index.columns:
        index = index[index["split"] == split]
    if index.empty:
        raise McdmError(f"{index_path}: no {split} clips to train the motion encoders on")
    clips = []
    for clip_id in tqdm(index["clip_id"].astype(str), desc="motion_encoders: load features", leave=False,
                        disable=not show_progress):
        path = features_dir / f"{clip_id}.safetensors"
        if not path.exists():
            raise McdmError(f"{path}: listed in {index_path.name} but missing (re-run `dvc repro features`)")
        arrays = load_file(str(path))
        missing = [k for k in REQUIRED_KEYS if k not in arrays]
        if missing:
            raise McdmError(f"{path}: lacks {', '.join(missing)}")
        n = {k: len(arrays[k]) for k in REQUIRED_KEYS}
        if len(set(n.values())) != 1:
            raise McdmError(f"{path}: per-frame arrays disagree in length {n}")
        clips.append(ClipFeatures(
            clip_id=clip_id,
            audio=torch.from_numpy(arrays["audio"].astype(np.float32)),
            mouths=torch.from_numpy(arrays["mouth_crops"].astype(np.uint8)),
            offsets=torch.from_numpy(expression_offsets(arrays["landmarks"])),
            head_pose=torch.from_numpy(arrays["head_pose"].astype(np.float32)),
        ))
    return clips


def _window_index(centres: torch.Tensor, window: int, n_frames: int) -> torch.Tensor:
    half = window // 2
    return (centres[:, None] + torch.arange(-half, window - half)[None]).clamp(0, n_frames - 1)


def _shift_candidates(t: int, n_frames: int) -> list[int]:
    return [t + s for m in range(MIN_SHIFT, MAX_SHIFT + 1) for s in (m, -m) if 0 <= t + s < n_frames]


def lip_batch(clips: list[ClipFeatures], batch_size: int, window: int, rng: np.random.Generator):
    """Mouth windows (B, W, 32, 48), positive audio windows (B, W, A), shifted audio windows (B, N, W, A)."""
    eligible = [c for c in clips if c.n_frames >= MIN_FRAMES]
    if not eligible:
        raise McdmError(f"motion_encoders: no clip has the {MIN_FRAMES} frames a shifted negative needs")
    weights = np.array([c.n_frames for c in eligible], dtype=np.float64)
    picks = rng.choice(len(eligible), size=batch_size, p=weights / weights.sum())
    mouths, pos, neg = [], [], []
    for i in picks:
        clip = eligible[i]
        t = int(rng.integers(clip.n_frames))
        cands = _shift_candidates(t, clip.n_frames)
        shifted = torch.as_tensor(rng.choice(cands, size=N_SHIFTS))
        mouths.append(clip.mouths[_window_index(torch.tensor([t]), window, clip.n_frames)[0]])
        pos.append(clip.audio[_window_index(torch.tensor([t]), window, clip.n_frames)[0]])
        neg.append(clip.audio[_window_index(shifted, window, clip.n_frames)])
    return torch.stack(mouths), torch.stack(pos), torch.stack(neg)


def lip_infonce(lip: LipEncoder, audio_enc: LipAudioEncoder, mouths, pos, neg) -> torch.Tensor:
    """InfoNCE with random-shift negatives (same clip) and in-batch negatives (other clips)."""
    b, n = neg.shape[:2]
    v = lip(mouths)  # (B, D)
    a_pos = audio_enc(pos)  # (B, D)
    a_neg = audio_enc(neg.flatten(0, 1)).view(b, n, -1)  # (B, N, D)
    shifted = torch.einsum("bd,bnd->bn", v, a_neg)
    in_batch = v @ a_pos.T  # (B, B): diagonal = positives
    logits = torch.cat([in_batch, shifted], dim=1) / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(b, device=logits.device))


@torch.no_grad()
def lip_sync_accuracy(lip: LipEncoder, audio_enc: LipAudioEncoder, clips: list[ClipFeatures], window: int,
                      max_centres: int = 64) -> float:
    """Fraction of centres t whose true audio window outscores every shifted one within +-MAX_SHIFT."""
    hits, total = 0, 0
    dev = next(lip.parameters()).device
    for clip in (c for c in clips if c.n_frames >= MIN_FRAMES):
        n = clip.n_frames
        centres = torch.arange(n)[:: max(1, n // max_centres)]
        v = lip(clip.mouths[_window_index(centres, window, n)].to(dev))  # (C, D)
        a = audio_enc(clip.audio[_window_index(torch.arange(n), window, n)].to(dev))  # (n, D)
        for ci, t in enumerate(centres.tolist()):
            offsets = [t] + _shift_candidates(t, n)
            scores = a[offsets] @ v[ci]
            hits += int(scores.argmax().item() == 0)
            total += 1
    return hits / max(total, 1)


def train_lip_encoder(clips, val_clips, params: Params, device, rng, show=True):
    m = params.model
    audio_dim = int(clips[0].audio.shape[1])
    lip = LipEncoder(window=m.lip_window, lip_dim=m.lip_dim).to(device)
    audio_enc = LipAudioEncoder(audio_dim=audio_dim, window=m.lip_window, lip_dim=m.lip_dim)
    audio_enc = audio_enc.fit(torch.cat([c.audio for c in clips])).to(device)
    opt = torch.optim.AdamW([*lip.parameters(), *audio_enc.parameters()], lr=m.motion_encoder_lr, weight_decay=1e-4)
    loop = StepLoop([*lip.parameters(), *audio_enc.parameters()], opt, m.motion_encoder_steps,
                    desc="motion_encoders: lip (InfoNCE)", progress=show)
    for _ in loop:
        mouths, pos, neg = (x.to(device) for x in lip_batch(clips, m.motion_encoder_batch_size, m.lip_window, rng))
        loop.step(lip_infonce(lip, audio_enc, mouths, pos, neg))
    losses = loop.losses
    lip.eval(), audio_enc.eval()
    chance = 1.0 / (2 * MAX_SHIFT + 1)
    metrics = {
        "lip_loss_first": float(np.mean(losses[: max(1, len(losses) // 10)])),
        "lip_loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])),
        "lip_sync_acc_val": lip_sync_accuracy(lip, audio_enc, val_clips, m.lip_window) if val_clips else float("nan"),
        "lip_sync_acc_train": lip_sync_accuracy(lip, audio_enc, clips[:8], m.lip_window),
        "lip_sync_acc_chance": chance,
    }
    return lip, audio_enc, metrics


def _expression_r2(enc: ExpressionEncoder, offsets: torch.Tensor) -> float:
    with torch.no_grad():
        recon = enc(offsets)[1]
    sse = ((recon - offsets) ** 2).sum()
    sst = ((offsets - offsets.mean(0)) ** 2).sum().clamp(min=1e-12)
    return float(1 - sse / sst)


def train_expression_encoder(clips, val_clips, params: Params, device, rng, show=True):
    m = params.model
    data = torch.cat([c.offsets for c in clips]).to(device)
    enc = ExpressionEncoder(in_dim=data.shape[1], expression_dim=m.expression_dim).to(device)
    enc.input_scale.fill_(float(data.std().clamp(min=1e-6)))
    opt = torch.optim.AdamW(enc.parameters(), lr=m.motion_encoder_lr, weight_decay=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
    scale = enc.input_scale
    loop = StepLoop(enc.parameters(), opt, m.motion_encoder_steps, desc="motion_encoders: expression (DAE)",
                    progress=show)
    for _ in loop:
        idx = torch.randint(0, data.shape[0], (4 * m.motion_encoder_batch_size,), generator=gen).to(device)
        x = data[idx]
        noisy = x + NOISE_SIGMA * scale * torch.randn(x.shape, generator=gen).to(device)
        keep = (torch.rand(x.shape[0], x.shape[1] // 2, generator=gen) >= P_DROP_POINT).to(device)
        noisy = noisy * keep.repeat_interleave(2, dim=1)  # a dropped point reads as neutral (offset 0)
        loop.step(F.mse_loss(enc(noisy)[1] / scale, x / scale))
    losses = loop.losses
    enc.eval()
    val = torch.cat([c.offsets for c in val_clips]).to(device) if val_clips else None
    metrics = {
        "expression_loss_first": float(np.mean(losses[: max(1, len(losses) // 10)])),
        "expression_loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])),
        "expression_r2_train": _expression_r2(enc, data),
        "expression_r2_val": _expression_r2(enc, val) if val is not None else float("nan"),
    }
    return enc, metrics


@torch.no_grad()
def fit_token_statistics(encoders: MotionEncoders, clips: list[ClipFeatures]) -> None:
    """Standardise every token with its training-clip mean / std (the prior then denoises unit-scale data)."""
    encoders.head.fit(torch.cat([c.head_pose for c in clips]))
    dev = encoders.lip.device
    lip_raw = torch.cat([
        encoders.lip(w.to(dev)) for c in clips
        for w in c.mouths[_window_index(torch.arange(c.n_frames), encoders.lip.config.window, c.n_frames)].split(256)
    ]) * math.sqrt(encoders.lip.config.lip_dim)
    encoders.lip.token_mean.copy_(lip_raw.mean(0))
    encoders.lip.token_std.copy_(lip_raw.std(0).clamp(min=1e-3))
    codes = encoders.expression(torch.cat([c.offsets for c in clips]).to(encoders.expression.device))[0]
    encoders.expression.token_mean.copy_(codes.mean(0))
    encoders.expression.token_std.copy_(codes.std(0).clamp(min=1e-3))


def split_validation(clips: list[ClipFeatures]) -> tuple[list[ClipFeatures], list[ClipFeatures]]:
    """Every 10th clip (at least one when there are 3 or more) is held out for the metrics."""
    if len(clips) < 3:
        return clips, []
    val_idx = set(range(0, len(clips), 10)) if len(clips) >= 10 else {len(clips) - 1}
    return [c for i, c in enumerate(clips) if i not in val_idx], [c for i, c in enumerate(clips) if i in val_idx]


def train_motion_encoders(features_dir: str | Path, out_dir: str | Path, params: Params, show_progress: bool = True) -> dict:
    """Train, freeze and save ``<out_dir>/{head,lip,lip_audio,expression}`` + ``metrics.json``
    (written to ``<out_dir>.tmp`` and renamed, so a killed run leaves no half output)."""
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clips = load_feature_clips(features_dir, show_progress=show_progress)
    train, val = split_validation(clips)
    lip, lip_audio, lip_metrics = train_lip_encoder(train, val, params, device, rng, show_progress)
    expression, expr_metrics = train_expression_encoder(train, val, params, device, rng, show_progress)
    encoders = MotionEncoders(head=HeadPoseEncoder().to(device), lip=lip, lip_audio=lip_audio, expression=expression)
    fit_token_statistics(encoders, clips)
    metrics = {
        "n_clips": len(clips), "n_train_clips": len(train), "n_val_clips": len(val),
        "n_frames": int(sum(c.n_frames for c in clips)), "audio_dim": int(clips[0].audio.shape[1]),
        **{f"{k}_dim": v for k, v in encoders.dims.items()},
        **lip_metrics, **expr_metrics,
        "objectives": {"lip": "InfoNCE, random-shift + in-batch negatives", "expression": "denoising autoencoder on pose-normalised landmark offsets", "head": "head pose standardised"},
    }
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for model in (encoders.head, encoders.lip, encoders.lip_audio, encoders.expression):
        model.to("cpu").requires_grad_(False)
    encoders.save(tmp)
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return metrics
