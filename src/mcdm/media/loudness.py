"""Speech as users record it: integrated loudness (ITU-R BS.1770-4, pyloudnorm), normalisation to a
target, and where the speech starts and ends (leading and trailing silence).

- :func:`normalize_loudness`: the gain that brings the integrated loudness to ``target_lufs``, then the
  sample peak scaled down to ``peak_dbfs`` if the gain pushed it past. Clips shorter than one 400 ms
  gating block are measured on the clip looped to one block (zero padding would read them quieter);
  silence (below the -70 LUFS absolute gate: pyloudnorm returns -inf) is left as it is.
- :func:`speech_bounds`: the energy detector: RMS over 20 ms frames in dBFS; a frame holds sound when
  it is above ``max(loudest - relative_db, floor_dbfs)`` (relative alone calls pure noise speech,
  absolute alone misses quiet recordings).
- :func:`speech_bounds_silero`: the silero-vad model (its weights ship inside its wheel; torch only).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

FRAME_SECONDS = 0.02


@dataclass
class SpeechReport:
    """What was measured on (and done to) one speech track; ``line()`` is the one-line summary."""

    seconds: float
    lufs: float  # integrated loudness as given (-inf: silent)
    lufs_out: Optional[float]  # after normalisation (None: not normalised)
    gain_db: float
    speech_start: float  # seconds of leading silence
    speech_end: float  # where the trailing silence begins
    detector: str
    trimmed: bool = False

    @property
    def trailing(self) -> float:
        return max(0.0, self.seconds - self.speech_end)

    def line(self) -> str:
        level = "silent (below the -70 LUFS gate)" if not np.isfinite(self.lufs) else f"{self.lufs:.1f} LUFS"
        if self.lufs_out is not None and np.isfinite(self.lufs):
            level += f" -> {self.lufs_out:.1f} LUFS ({self.gain_db:+.1f} dB)"
        if self.speech_end <= self.speech_start:
            found = f"no speech found ({self.detector})"
        else:
            found = (f"leading silence {self.speech_start:.2f} s, trailing {self.trailing:.2f} s "
                     f"({self.detector}{', trimmed' if self.trimmed else ''})")
        return f"speech: {self.seconds:.2f} s decoded, at {level}; {found}"

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


def integrated_loudness(audio: np.ndarray, rate: int) -> float:
    """BS.1770-4 integrated loudness in LUFS (-inf for silence); short clips measured looped."""
    import pyloudnorm

    x = np.asarray(audio, np.float64).reshape(-1)
    if x.size == 0:
        return float("-inf")
    meter = pyloudnorm.Meter(rate)
    need = int(meter.block_size * rate) + 1
    return float(meter.integrated_loudness(np.resize(x, need) if x.size < need else x))


def apply_gain(audio: np.ndarray, gain_db: float, peak_dbfs: float = -1.0) -> tuple[np.ndarray, float]:
    """(``audio`` times the gain, then scaled so its sample peak is at most ``peak_dbfs``; the gain in dB
    actually applied)."""
    y = np.asarray(audio, np.float32).reshape(-1) * np.float32(10 ** (gain_db / 20))
    peak, limit = float(np.abs(y).max()) if y.size else 0.0, 10 ** (peak_dbfs / 20)
    if peak > limit:
        y *= np.float32(limit / peak)
        gain_db += 20 * np.log10(limit / peak)
    return y, float(gain_db)


def normalize_loudness(audio: np.ndarray, rate: int, target_lufs: float = -23.0,
                       peak_dbfs: float = -1.0) -> tuple[np.ndarray, float, float]:
    """(normalised float32 audio, measured LUFS, gain in dB applied); silence comes back unchanged."""
    x = np.asarray(audio, np.float32).reshape(-1)
    lufs = integrated_loudness(x, rate)
    if not np.isfinite(lufs):
        return x.copy(), lufs, 0.0
    y, gain = apply_gain(x, target_lufs - lufs, peak_dbfs)
    return y, lufs, gain


def frame_db(audio: np.ndarray, rate: int) -> np.ndarray:
    """RMS level in dBFS of consecutive 20 ms frames."""
    n = max(1, int(rate * FRAME_SECONDS))
    x = np.asarray(audio, np.float64).reshape(-1)
    frames = np.resize(x, (max(1, -(-x.size // n)), n)) if x.size else np.zeros((1, n))
    if x.size % n and x.size > n:
        frames[-1, x.size % n:] = 0.0
    return 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)


def speech_bounds(audio: np.ndarray, rate: int, relative_db: float = 40.0,
                  floor_dbfs: float = -60.0) -> tuple[float, float]:
    """(start, end) seconds of the sound in ``audio`` by the energy detector; (0, 0) when all silent."""
    db = frame_db(audio, rate)
    sound = np.flatnonzero(db > max(db.max() - relative_db, floor_dbfs))
    if sound.size == 0:
        return 0.0, 0.0
    duration = np.asarray(audio).size / rate
    return float(sound[0] * FRAME_SECONDS), float(min(duration, (sound[-1] + 1) * FRAME_SECONDS))


def speech_bounds_silero(audio: np.ndarray, rate: int) -> tuple[float, float]:
    """(start, end) seconds of the speech silero-vad finds (its packaged weights, on the CPU); (0, 0)
    when it finds none. Needs 8 or 16 kHz audio."""
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    model = load_silero_vad()
    spans = get_speech_timestamps(torch.from_numpy(np.asarray(audio, np.float32).reshape(-1)), model,
                                  sampling_rate=rate, return_seconds=True)
    if not spans:
        return 0.0, 0.0
    return float(spans[0]["start"]), float(spans[-1]["end"])
