"""Frozen audio encoders (decisions.md #2): one feature row per video frame.

- ``wav2vec2``: ``Wav2Vec2Model.from_pretrained(local)``, hidden states (50 Hz) resampled to the video frames;
- ``logmel`` (the labelled fallback): 80-bin log-mel frames (25 ms Hann window, 10 ms hop, Slaney mel
  scale) averaged per video frame.

Both are callables ``(audio_16k, fps, n_frames) -> (T, dim)`` with a ``name`` label.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from transformers import Wav2Vec2Model
from transformers.audio_utils import mel_filter_bank

from mcdm.errors import McdmError
from mcdm.models.loading import load_transformers_folder

AUDIO_RATE = 16000


# =============================================================================================
# Audio: log-mel fallback and wav2vec2, one feature row per video frame
# =============================================================================================
def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: Optional[float] = None) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters on the Slaney mel scale, Slaney (area) normalised: the
    library's (``transformers.audio_utils.mel_filter_bank``, what Whisper's and wav2vec2's feature
    extractors use)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    return torch.from_numpy(mel_filter_bank(n_freqs, n_mels, f_min, f_max, sample_rate, norm="slaney",
                                            mel_scale="slaney")).float()


def logmel(audio: torch.Tensor, sample_rate: int = AUDIO_RATE, n_mels: int = 80, n_fft: int = 512,
           win_length: int = 400, hop_length: int = 160, floor: float = 1e-6) -> torch.Tensor:
    """(J, n_mels) natural-log mel power spectrogram; frame j is centred at j * hop / rate seconds."""
    window = torch.hann_window(win_length, periodic=True, dtype=torch.float32)
    spec = torch.stft(audio.float(), n_fft=n_fft, hop_length=hop_length, win_length=win_length, window=window,
                      center=True, pad_mode="reflect", return_complex=True)
    power = spec.abs() ** 2  # (n_fft//2+1, J)
    mel = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate).T @ power
    return torch.log(mel.clamp(min=floor)).T


def logmel_per_frame(audio_16k: np.ndarray | torch.Tensor, fps: float, n_frames: Optional[int] = None,
                     n_mels: int = 80, sample_rate: int = AUDIO_RATE) -> np.ndarray:
    """(T, n_mels) log-mel features aligned to video frames (the ``logmel`` audio backend).

    Mel frames (25 ms Hann window, 10 ms hop) whose centre falls inside video frame t's interval
    [t / fps, (t + 1) / fps) are averaged; a frame with none (audio too short) takes the mel frame
    nearest to its centre. T = ``n_frames``, or round(duration * fps) when not given.
    """
    audio = torch.as_tensor(np.asarray(audio_16k, dtype=np.float32)).flatten()
    if audio.numel() == 0:
        raise McdmError("logmel_per_frame: empty audio")
    if n_frames is None:
        n_frames = max(1, int(round(audio.numel() / sample_rate * fps)))
    if audio.numel() < 400:  # shorter than one analysis window: pad with silence
        audio = F.pad(audio, (0, 400 - audio.numel()))
    mel = logmel(audio, sample_rate, n_mels)  # (J, n_mels)
    hop = 160
    # video frame whose interval holds mel frame j: floor(j hop fps / rate), multiplied before dividing
    # so that centres on a frame boundary (e.g. j = 4 at 25 fps) land exactly
    owner = torch.floor(torch.arange(mel.shape[0], dtype=torch.float64) * hop * fps / sample_rate).long()
    inside = owner < n_frames
    sums = torch.zeros(n_frames, n_mels).index_add_(0, owner[inside], mel[inside])
    counts = torch.zeros(n_frames).index_add_(0, owner[inside], torch.ones(int(inside.sum())))
    centre = (torch.arange(n_frames, dtype=torch.float64) + 0.5) / fps
    nearest = torch.round(centre * sample_rate / hop).long().clamp(0, mel.shape[0] - 1)
    out = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], mel[nearest])
    return out.numpy().astype(np.float32)


class LogMelAudio:
    """Fallback audio backend (decisions.md #2): 80-bin log-mel per video frame. Label: ``logmel``."""

    name = "logmel"

    def __init__(self, n_mels: int = 80):
        self.dim = n_mels

    def __call__(self, audio_16k: np.ndarray, fps: float, n_frames: Optional[int] = None) -> np.ndarray:
        return logmel_per_frame(audio_16k, fps, n_frames, n_mels=self.dim)


class Wav2Vec2Audio:
    """Frozen Wav2Vec 2.0 from a local folder; last hidden states (50 Hz) linearly resampled to T frames."""

    name = "wav2vec2"

    def __init__(self, model: Wav2Vec2Model, normalize: bool = True):
        self.model = model.eval().requires_grad_(False)
        self.device = model.device
        self.dim = int(model.config.hidden_size)
        self.normalize = normalize  # the feature extractor's do_normalize: zero mean, unit variance per utterance

    @classmethod
    def from_folder(cls, path: str | Path, device: str | torch.device = "cpu") -> "Wav2Vec2Audio":
        """A local ``save_pretrained`` folder (safetensors weights; a pickled ``.bin`` is refused)."""
        model, pre = load_transformers_folder(Wav2Vec2Model, path, "base_models.wav2vec2_path", device)
        return cls(model, pre.get("do_normalize", True))

    @classmethod
    def from_model(cls, model: Wav2Vec2Model) -> "Wav2Vec2Audio":
        """A loaded model (a pipeline component)."""
        return cls(model)

    @torch.no_grad()
    def __call__(self, audio_16k: np.ndarray, fps: float, n_frames: Optional[int] = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(audio_16k, dtype=np.float32)).flatten()
        if n_frames is None:
            n_frames = max(1, int(round(x.numel() / AUDIO_RATE * fps)))
        min_len = 400 * 2  # the conv feature extractor needs a few receptive fields
        if x.numel() < min_len:
            x = F.pad(x, (0, min_len - x.numel()))
        if self.normalize:
            x = (x - x.mean()) / torch.sqrt(x.var() + 1e-7)
        hidden = self.model(x[None].to(self.device)).last_hidden_state  # (1, N, dim) at ~50 Hz
        # resample to video frames: (1, dim, N) -> (1, dim, T)
        hidden = F.interpolate(rearrange(hidden, "b n d -> b d n"), size=n_frames, mode="linear", align_corners=False)
        return rearrange(hidden, "b d t -> (b t) d").float().cpu().numpy()
