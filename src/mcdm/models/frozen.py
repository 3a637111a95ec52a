"""The frozen encoders that turn a clip into conditioning (decisions.md #2): the VAE, the audio backend and
the identity backend. The ``features`` stage (training clips) and the pipeline (a user's portrait and
speech) load them one way, so both compute the same features."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mcdm.errors import McdmError
from mcdm.models.audio_features import LogMelAudio, Wav2Vec2Audio
from mcdm.models.identity import ClipIdentity, DlibVaeIdentity
from mcdm.models.vae import load_vae


@dataclass
class FrozenEncoders:
    vae: object  # AutoencoderKL, frozen
    audio: LogMelAudio | Wav2Vec2Audio  # (audio_16k, fps, n_frames) -> (T, A); .name is the backend label
    identity: ClipIdentity | DlibVaeIdentity  # (rgb crop, landmarks) -> (E,); .name is the backend label


def load_audio_encoder(backend: str, folder: Optional[str | Path] = None, device: str | torch.device = "cpu"):
    """The audio backend: ``wav2vec2`` (weights in ``folder``) or ``logmel`` (no weights)."""
    if backend == "wav2vec2":
        return Wav2Vec2Audio.from_folder(folder, device)
    if backend == "logmel":
        return LogMelAudio()
    raise McdmError(f"unknown audio backend {backend!r} (wav2vec2 | logmel)")


def load_identity_encoder(backend: str, folder: Optional[str | Path] = None, vae=None,
                          device: str | torch.device = "cpu"):
    """The identity backend: ``clip`` (weights in ``folder``) or ``dlib+vae`` (dlib + the given VAE)."""
    if backend == "clip":
        return ClipIdentity.from_folder(folder, device)
    if backend == "dlib+vae":
        if vae is None:
            raise McdmError("the dlib+vae identity backend needs the VAE")
        return DlibVaeIdentity(vae, device)
    raise McdmError(f"unknown image backend {backend!r} (clip | dlib+vae)")


def load_frozen_encoders(vae_dir: str | Path, audio_backend: str, image_backend: str,
                         audio_dir: Optional[str | Path] = None, image_dir: Optional[str | Path] = None,
                         device: str | torch.device = "cpu") -> FrozenEncoders:
    """The three frozen encoders (``mcdm.media.layout.frozen_encoder_paths`` gives the arguments of a
    ``models/base`` folder)."""
    vae = load_vae(vae_dir, device)
    return FrozenEncoders(vae=vae, audio=load_audio_encoder(audio_backend, audio_dir, device),
                          identity=load_identity_encoder(image_backend, image_dir, vae, device))
