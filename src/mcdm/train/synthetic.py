"""A synthetic training project: feature files in the ``features`` stage's contract, random
(untrained) base VAE / UNet in the ``base_models`` layout and untrained motion encoders.

It exercises the training stages' plumbing (shapes, which weights train, DeepSpeed, chaining,
throughput and memory) without data stages: the stage tests build a tiny one, and the GPU smoke
benchmark (``benchmarks/bench_gpu_smoke.py``) builds one at 256 px with the paper profile's model.
Nothing here is a trained model; its losses say nothing about quality.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from mcdm.config import Params
from mcdm.face.geometry import CANONICAL_68, expression_offsets, head_pose_from_landmarks
from mcdm.models.motion_encoders import ExpressionEncoder, HeadPoseEncoder, LipAudioEncoder, LipEncoder, MotionEncoders
from mcdm.models.schedulers import make_scheduler
from mcdm.train.builders import tiny_unet_config, tiny_vae_config
from mcdm.train.stages.inputs import StageInputs

#: the latent channels of SD-1.5's VAE (and of ours)
LATENT_CHANNELS = 4


def write_features(folder: str | Path, n_videos: int = 4, n_frames: int = 24, seed: int = 0, *, res: int = 32,
                   latent: int = 4, audio_dim: int = 80, ref_dim: int = 144) -> Path:
    """Feature files whose latents, audio, landmarks and mouth crops all follow one mouth-opening
    signal per frame (so every condition carries information about the frames). The last video is
    the test split, the others train."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    audio_w = rng.standard_normal(audio_dim)
    latent_w = rng.standard_normal((LATENT_CHANNELS, latent, latent))
    rows = []
    for i in range(n_videos):
        opening = 0.5 + 0.5 * np.sin(np.arange(n_frames) * rng.uniform(0.3, 0.9) + rng.uniform(0, 6))
        identity = rng.standard_normal((LATENT_CHANNELS, latent, latent))
        latents = identity[None] + opening[:, None, None, None] * latent_w[None]
        lm = np.repeat(CANONICAL_68[None], n_frames, 0).copy()
        lm[:, [56, 57, 58, 65, 66, 67], 1] += 0.3 * opening[:, None]
        lm = (lm * res / 4 + res / 2).astype(np.float32)
        mouths = np.full((n_frames, 32, 48), 160, np.uint8)
        mouths[:, 12:20, 10:38] = (30 + 100 * opening[:, None, None]).astype(np.uint8)
        audio = np.outer(opening, audio_w) + 0.1 * rng.standard_normal((n_frames, audio_dim))
        tensors = {
            "frames": torch.from_numpy(rng.integers(0, 255, (n_frames, 3, res, res), dtype=np.uint8)),
            "latents": torch.from_numpy(latents.astype(np.float32)),
            "audio": torch.from_numpy(audio.astype(np.float32)),
            "waveform": torch.zeros(n_frames * 640),
            "ref_embedding": torch.from_numpy(rng.standard_normal(ref_dim).astype(np.float32)),
            "landmarks": torch.from_numpy(lm),
            "detected": torch.ones(n_frames, dtype=torch.uint8),
            "head_pose": torch.from_numpy(head_pose_from_landmarks(lm, res).astype(np.float32)),
            "expression": torch.from_numpy(expression_offsets(lm)),
            "mouth_crops": torch.from_numpy(mouths),
        }
        save_file(tensors, str(folder / f"clip{i}.safetensors"))
        rows.append({"clip_id": f"clip{i}", "split": "train" if i < n_videos - 1 else "test",
                     "n_frames": n_frames, "path": str(folder / f"clip{i}.safetensors")})
    pd.DataFrame(rows).to_parquet(folder / "index.parquet")
    meta = {"fps": 25.0, "resolution": res,
            "latents": {"shape": [LATENT_CHANNELS, latent, latent], "scaling_factor": 1.0},
            "audio": {"backend": "logmel", "dim": audio_dim}, "image": {"backend": "dlib+vae", "dim": ref_dim},
            "synthetic": True}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def write_base(folder: str | Path, params: Params, *, res: int = 32, latent: int = 4, audio_dim: int = 80,
               ref_dim: int = 144, vae_widths: tuple[int, ...] = (8, 8, 8, 8)) -> Path:
    """Random (untrained) VAE and SD-shaped UNet at ``params.model``'s widths, in the base_models
    layout: plumbing only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel


    folder = Path(folder)
    torch.manual_seed(0)
    bm = params.base_models.model_copy(update={"vae_block_out_channels": list(vae_widths),
                                               "vae_norm_num_groups": min(vae_widths)})
    AutoencoderKL(**tiny_vae_config(bm, res)).save_pretrained(folder / "vae")
    UNet2DConditionModel(**tiny_unet_config(params.model, latent, LATENT_CHANNELS)).save_pretrained(folder / "unet")
    make_scheduler().save_pretrained(folder / "scheduler")
    (folder / "encoders.json").write_text(json.dumps({"audio": {"backend": "logmel", "dim": audio_dim},
                                                      "image": {"backend": "dlib+vae", "dim": ref_dim}}))
    return folder


def write_motion_encoders(folder: str | Path, params: Params, *, audio_dim: int = 80) -> Path:
    """Untrained motion encoders in the ``motion_encoders`` stage's layout."""
    folder = Path(folder)
    m = params.model
    torch.manual_seed(0)
    MotionEncoders(head=HeadPoseEncoder(), lip=LipEncoder(window=m.lip_window, lip_dim=m.lip_dim),
                   lip_audio=LipAudioEncoder(audio_dim=audio_dim, window=m.lip_window, lip_dim=m.lip_dim),
                   expression=ExpressionEncoder(expression_dim=m.expression_dim)).save(folder)
    (folder / "metrics.json").write_text("{}")
    return folder


def write_project(root: str | Path, params: Params, *, res: int, latent: int, n_videos: int = 4, n_frames: int = 24,
                  audio_dim: int | None = None, ref_dim: int = 144,
                  vae_widths: tuple[int, ...] = (8, 8, 8, 8)) -> Path:
    """Features, base models and motion encoders under ``root`` (``data/features``, ``models/base``,
    ``models/motion_encoders``); the audio width defaults to ``params.model.audio_dim``."""
    root = Path(root)
    audio_dim = params.model.audio_dim if audio_dim is None else audio_dim
    write_features(root / "data" / "features", n_videos, n_frames, res=res, latent=latent, audio_dim=audio_dim,
                   ref_dim=ref_dim)
    write_base(root / "models" / "base", params, res=res, latent=latent, audio_dim=audio_dim, ref_dim=ref_dim,
               vae_widths=vae_widths)
    write_motion_encoders(root / "models" / "motion_encoders", params, audio_dim=audio_dim)
    return root


def inputs_for(root: str | Path, stage: int) -> StageInputs:
    """The stage inputs of a project written by :func:`write_project` (earlier stages exported
    under ``models/stage<k>``)."""
    root = Path(root)
    prev = tuple(root / "models" / f"stage{k}" for k in range(1, stage))
    return StageInputs(features=root / "data" / "features", base=root / "models" / "base",
                       motion_encoders=root / "models" / "motion_encoders", prev=prev)
