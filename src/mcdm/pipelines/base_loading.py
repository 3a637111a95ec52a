"""The one loader of the base models: every later stage reads them from ``models/base/`` through here.

``base_models`` writes the same layout whether the weights came from local paper-scale folders
(SD-1.5 VAE / UNet, Wav2Vec 2.0, CLIP vision) or were pretrained here at the embedded scale:

    models/base/vae/            diffusers AutoencoderKL (save_pretrained)
    models/base/unet/           diffusers UNet2DConditionModel, SD-1.5 layout
    models/base/ref_tokens/     ReferenceTokens (only when the UNet was pretrained here)
    models/base/scheduler/      DDPMScheduler config (SD-1.5's training schedule)
    models/base/audio_encoder/  Wav2Vec2Model (only with base_models.wav2vec2_path)
    models/base/image_encoder/  CLIPVisionModelWithProjection (only with base_models.clip_path)
    models/base/encoders.json   which audio / identity backend is used, their dims and sources

Every network loads with ``from_pretrained(local_dir)`` and fails (one line) on a missing or
unexpected weight.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mcdm.errors import McdmError, MissingStageOutput

STAGE = "base_models"
VAE, UNET, REF_TOKENS, SCHEDULER = "vae", "unet", "ref_tokens", "scheduler"
AUDIO_ENCODER, IMAGE_ENCODER = "audio_encoder", "image_encoder"
ENCODERS_JSON = "encoders.json"


def _folder(models_dir: str | Path, name: str) -> Path:
    path = Path(models_dir) / name
    if not path.is_dir():
        raise MissingStageOutput(path, STAGE)
    return path


def read_encoders(models_dir: str | Path) -> dict:
    """``encoders.json``: ``{"audio": {"backend", "dim", "source"}, "image": {...}, "vae": {...}, "unet": {...}}``."""
    path = Path(models_dir) / ENCODERS_JSON
    if not path.exists():
        raise MissingStageOutput(path, STAGE)
    return json.loads(path.read_text())


def load_vae(models_dir: str | Path, device: str | torch.device = "cpu"):
    """The frozen VAE (``requires_grad`` off, eval mode)."""
    from diffusers import AutoencoderKL

    from mcdm.models.encoders import load_strict

    return load_strict(AutoencoderKL, _folder(models_dir, VAE)).requires_grad_(False).to(device)


def load_unet(models_dir: str | Path, device: str | torch.device = "cpu"):
    """The SD-shaped UNet the MCDM UNet is built from (eval mode; the caller decides what trains)."""
    from diffusers import UNet2DConditionModel

    from mcdm.models.encoders import load_strict

    return load_strict(UNet2DConditionModel, _folder(models_dir, UNET)).to(device)


def load_ref_tokens(models_dir: str | Path, device: str | torch.device = "cpu"):
    """The reference tokenizer pretrained with the UNet, or None when the UNet came from a path."""
    from mcdm.models.reference_tokens import ReferenceTokens
    from mcdm.models.encoders import load_strict

    path = Path(models_dir) / REF_TOKENS
    if not path.is_dir():
        _folder(models_dir, UNET)  # the stage has run at all
        return None
    return load_strict(ReferenceTokens, path).to(device)


def load_scheduler(models_dir: str | Path):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(_folder(models_dir, SCHEDULER))


def load_audio_encoder(models_dir: str | Path, device: str | torch.device = "cpu"):
    """The audio backend named in ``encoders.json``: ``wav2vec2`` (saved here) or ``logmel``.

    Callable ``(audio_16k, fps, n_frames) -> (T, dim)``; ``.name`` is the backend label.
    """
    from mcdm.models import encoders

    backend = read_encoders(models_dir)["audio"]["backend"]
    if backend == "wav2vec2":
        return encoders.Wav2Vec2Audio(_folder(models_dir, AUDIO_ENCODER), device)
    if backend == "logmel":
        return encoders.LogMelAudio()
    raise McdmError(f"{Path(models_dir) / ENCODERS_JSON}: unknown audio backend {backend!r}")


def load_identity_encoder(models_dir: str | Path, device: str | torch.device = "cpu"):
    """The identity backend named in ``encoders.json``: ``clip`` (saved here) or ``dlib+vae``.

    Callable ``(rgb uint8 HxWx3, landmarks (68, 2) or None) -> (dim,)``; ``.name`` is the label.
    """
    from mcdm.models import encoders

    backend = read_encoders(models_dir)["image"]["backend"]
    if backend == "clip":
        return encoders.ClipIdentity(_folder(models_dir, IMAGE_ENCODER), device)
    if backend == "dlib+vae":
        return encoders.DlibVaeIdentity(load_vae(models_dir), device)
    raise McdmError(f"{Path(models_dir) / ENCODERS_JSON}: unknown image backend {backend!r}")


@dataclass
class BaseModels:
    """Everything ``base_models`` made, loaded: what the training stages start from."""

    vae: object
    unet: object
    ref_tokens: Optional[object]
    scheduler: object
    encoders: dict

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = int(self.vae.config.latent_channels)
        s = int(self.unet.config.sample_size)
        return c, s, s


def load_base_models(models_dir: str | Path, device: str | torch.device = "cpu") -> BaseModels:
    return BaseModels(
        vae=load_vae(models_dir, device),
        unet=load_unet(models_dir, device),
        ref_tokens=load_ref_tokens(models_dir, device),
        scheduler=load_scheduler(models_dir),
        encoders=read_encoders(models_dir),
    )
