"""The user's speech as it comes, made ready for generation (decisions.md #27).

1. where the speech starts and ends: the energy detector, or silero-vad (``silence_detector``);
2. with ``trim_silence``, the leading and trailing silence cut (``silence_margin_seconds`` kept);
3. the first ``seconds`` of it, padded to whole frames (:meth:`MCDMPipeline.prepare_speech`);
4. loudness-normalised to ``loudness_lufs`` (peak at most ``peak_dbfs``) for the audio features: the
   integrated loudness is measured on all the speech decoded (the segment used and, with ``--seconds``,
   the second after it: a recording's level, not its first words'), and that gain applied to the segment.

The video's sound track is the segment at its own level (the speech the user gave, not a louder or
quieter copy); only the features see the normalised one. Hallo's vocal separation needs a separation
network's weights downloaded at run time: not done here (decisions.md #27); give a separated vocal
track when the recording has music or noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from mcdm.config.generation import GenerationSettings
from mcdm.errors import McdmError
from mcdm.media.loudness import (
    SpeechReport,
    apply_gain,
    integrated_loudness,
    speech_bounds,
    speech_bounds_silero,
)


@dataclass
class PreparedSpeech:
    features: np.ndarray  # what the audio features read (normalised)
    track: np.ndarray  # what is muxed into the video (the segment as given)
    n_frames: int
    report: SpeechReport


def detect_speech(audio: np.ndarray, rate: int, settings: GenerationSettings) -> tuple[float, float]:
    if settings.silence_detector == "silero":
        if rate not in (8000, 16000):
            raise McdmError(f"silence detector silero: needs 8 or 16 kHz audio, not {rate} Hz")
        return speech_bounds_silero(audio, rate)
    return speech_bounds(audio, rate, settings.silence_relative_db, settings.silence_floor_dbfs)


def prepare_user_speech(pipe, audio: np.ndarray, settings: GenerationSettings,
                        seconds: Optional[float] = None) -> PreparedSpeech:
    """16 kHz mono speech (as read) -> what ``pipe`` generates from and what the video carries."""
    rate = int(pipe.data_params.audio_rate)
    audio = np.asarray(audio, np.float32).reshape(-1)
    given = audio.size / rate
    start, end = detect_speech(audio, rate, settings)
    trimmed = False
    if settings.trim_silence:
        if end <= start:
            raise McdmError("audio: no speech found to keep (all silence); generate without trimming")
        margin = settings.silence_margin_seconds
        a, b = int(max(0.0, start - margin) * rate), int(min(audio.size / rate, end + margin) * rate)
        audio, trimmed = audio[a:b], (a, b) != (0, audio.size)
    segment, n_frames = pipe.prepare_speech(audio, seconds)
    # the level is the recording's: measured on all the speech decoded, applied to the segment used
    lufs = integrated_loudness(audio, rate)
    features, gain, lufs_out = segment, 0.0, None
    if settings.loudness_lufs is not None and np.isfinite(lufs):
        features, gain = apply_gain(segment, settings.loudness_lufs - lufs, settings.peak_dbfs)
        lufs_out = lufs + gain
    report = SpeechReport(seconds=given, lufs=lufs, lufs_out=lufs_out, gain_db=gain, speech_start=start,
                          speech_end=end, detector=settings.silence_detector, trimmed=trimmed)
    return PreparedSpeech(features, segment, n_frames, report)
