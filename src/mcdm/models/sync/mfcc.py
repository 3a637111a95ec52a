"""MFCC front end of SyncNet: 13 coefficients at 100 Hz (25 ms frames, 10 ms hop) from 16 kHz audio.

This is the front end the official SyncNet weights were trained with (the defaults of the
``python_speech_features`` package, re-implemented here from their definition, in numpy):

1. pre-emphasis ``y[n] = x[n] - 0.97 x[n-1]``;
2. frames of 400 samples every 160 (rectangular window); the last frame is zero-padded, so
   ``n_frames = 1 + ceil((N - 400) / 160)``;
3. power spectrum ``P = |rfft(frame, 512)|^2 / 512``;
4. 26 triangular mel filters spanning 0 .. 8 kHz (``mel = 2595 log10(1 + hz / 700)``);
5. ``log``, DCT-II (orthonormal), keep 13 coefficients, sinusoidal lifter ``1 + 11 sin(pi n / 22)``;
6. c0 replaced by the log frame energy ``log(sum P)``.

At 25 fps a video frame spans 4 MFCC frames, so the SyncNet window of 5 video frames starting at
frame ``v`` pairs with MFCC frames ``4 v .. 4 v + 19`` (0.2 s, the 13 x 20 audio input).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16_000
WIN_LENGTH = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms -> 100 MFCC frames per second
N_FFT = 512
N_FILTERS = 26
N_MFCC = 13
PREEMPHASIS = 0.97
LIFTER = 22
MFCC_PER_VIDEO_FRAME = 4  # 100 Hz / 25 fps
WINDOW_FRAMES = 5  # video frames per SyncNet window
WINDOW_MFCC = WINDOW_FRAMES * MFCC_PER_VIDEO_FRAME  # 20 MFCC frames = 0.2 s
_EPS = np.finfo(np.float64).eps


def hz_to_mel(hz):
    """HTK mel scale: ``2595 log10(1 + hz / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(n_filters: int = N_FILTERS, n_fft: int = N_FFT, rate: int = SAMPLE_RATE,
                   low_hz: float = 0.0, high_hz: float | None = None) -> np.ndarray:
    """``(n_filters, n_fft // 2 + 1)`` triangular filters, equally spaced on the mel scale.

    Filter ``j`` rises linearly from FFT bin ``b[j]`` (0) to ``b[j+1]`` (1) and falls to ``b[j+2]``,
    where ``b = floor((n_fft + 1) * mel_to_hz(linspace(mel(low), mel(high), n_filters + 2)) / rate)``.
    """
    high_hz = rate / 2 if high_hz is None else high_hz
    mels = np.linspace(hz_to_mel(low_hz), hz_to_mel(high_hz), n_filters + 2)
    bins = np.floor((n_fft + 1) * mel_to_hz(mels) / rate).astype(int)
    bank = np.zeros((n_filters, n_fft // 2 + 1))
    for j in range(n_filters):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        rise = np.arange(lo, mid)
        fall = np.arange(mid, hi)
        bank[j, rise] = (rise - lo) / max(mid - lo, 1)
        bank[j, fall] = (hi - fall) / max(hi - mid, 1)
    bank.setflags(write=False)
    return bank


@lru_cache(maxsize=8)
def dct_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Orthonormal DCT-II as a ``(n_out, n_in)`` matrix: ``X_k = s_k sum_n x_n cos(pi k (2n + 1) / 2N)``.

    ``s_0 = sqrt(1 / N)``, ``s_k = sqrt(2 / N)``; equal to ``scipy.fft.dct(x, type=2, norm="ortho")[:n_out]``.
    """
    n = np.arange(n_in)
    k = np.arange(n_out)[:, None]
    mat = np.cos(math.pi * k * (2 * n + 1) / (2 * n_in)) * math.sqrt(2.0 / n_in)
    mat[0] *= math.sqrt(0.5)
    mat.setflags(write=False)
    return mat


def n_mfcc_frames(n_samples: int) -> int:
    """MFCC frames for ``n_samples`` samples: ``1 + ceil((N - 400) / 160)`` (1 when N <= 400)."""
    if n_samples <= WIN_LENGTH:
        return 1
    return 1 + math.ceil((n_samples - WIN_LENGTH) / HOP_LENGTH)


def power_frames(audio: np.ndarray) -> np.ndarray:
    """Pre-emphasised, framed power spectra ``(n_frames, n_fft // 2 + 1)``."""
    x = np.asarray(audio, np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("mfcc: empty audio")
    x = np.append(x[0], x[1:] - PREEMPHASIS * x[:-1])  # 1. pre-emphasis
    n = n_mfcc_frames(x.size)  # 2. frames (last one zero-padded)
    x = np.pad(x, (0, (n - 1) * HOP_LENGTH + WIN_LENGTH - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(x, WIN_LENGTH)[::HOP_LENGTH][:n]
    return np.abs(np.fft.rfft(frames, N_FFT)) ** 2 / N_FFT  # 3. power spectrum


def mfcc(audio: np.ndarray, rate: int = SAMPLE_RATE, n_mfcc: int = N_MFCC) -> np.ndarray:
    """``(n_mfcc, n_frames)`` float32 MFCCs at 100 Hz of mono ``audio`` sampled at ``rate`` (16 kHz)."""
    if rate != SAMPLE_RATE:
        raise ValueError(f"mfcc: audio must be {SAMPLE_RATE} Hz (got {rate}); read it with read_audio(rate=16000)")
    power = power_frames(audio)  # (T, 257)
    energy = np.maximum(power.sum(axis=1), _EPS)
    mel = np.maximum(power @ mel_filterbank().T, _EPS)  # 4. mel filterbank energies (T, 26)
    cep = np.log(mel) @ dct_matrix(N_FILTERS, n_mfcc).T  # 5. log + DCT-II -> (T, n_mfcc)
    cep = cep * (1.0 + (LIFTER / 2.0) * np.sin(math.pi * np.arange(n_mfcc) / LIFTER))  # lifter
    cep[:, 0] = np.log(energy)  # 6. c0 := log frame energy
    return cep.T.astype(np.float32)


def n_windows(n_video_frames: int, n_mfcc_frames_: int) -> int:
    """Number of complete 5-frame / 20-MFCC windows: window ``v`` needs frames ``v .. v+4`` and
    MFCC frames ``4v .. 4v+19``."""
    by_video = n_video_frames - WINDOW_FRAMES + 1
    by_audio = (n_mfcc_frames_ - WINDOW_MFCC) // MFCC_PER_VIDEO_FRAME + 1
    return max(0, min(by_video, by_audio))


def mfcc_windows(cep: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``(len(starts), 1, 13, 20)`` audio windows for video-frame starts ``starts`` (MFCC ``4 v ..``)."""
    idx = np.asarray(starts)[:, None] * MFCC_PER_VIDEO_FRAME + np.arange(WINDOW_MFCC)
    return np.ascontiguousarray(cep[:, idx].transpose(1, 0, 2)[:, None])
