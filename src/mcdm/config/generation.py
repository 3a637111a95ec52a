"""The settings of generation for users (`mcdm generate`, `mcdm demo`, the served MLflow model): the one
place where their defaults live.

They are not pipeline params: no DVC stage reads them and a checkpoint does not carry them, so
generation from any folder uses these defaults, and each command option (``--device``, ``--lufs``, ...)
overrides one of them. What the checkpoint was trained with (clip format, steps, seed) comes from the
checkpoint's own params.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from mcdm.config.section import Section

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
SilenceDetector = Literal["energy", "silero"]


class GenerationSettings(Section):
    # where it runs
    device: str = Field("auto", description="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N")
    dtype: Dtype = Field("auto", description="auto: float16 on CUDA (bfloat16 where supported), float32 on CPU")
    # the user's speech as it comes (ITU-R BS.1770 / EBU R128 loudness, pyloudnorm)
    loudness_lufs: Optional[float] = Field(
        -23.0, le=0, description="speech is loudness-normalised to this integrated loudness before the audio "
        "features (EBU R128's target); None: left as it is")
    peak_dbfs: float = Field(-1.0, le=0, description="after the gain, the sample peak is scaled down to at most this")
    silence_detector: SilenceDetector = Field(
        "energy", description="energy: 20 ms RMS frames below max(loudest - silence_relative_db, silence_floor_dbfs); "
        "silero: the silero-vad model shipped in its package")
    silence_relative_db: float = Field(40.0, gt=0, description="energy detector: dB below the loudest frame")
    silence_floor_dbfs: float = Field(-60.0, le=0, description="energy detector: frames below this are silent")
    silence_margin_seconds: float = Field(0.1, ge=0, description="kept on each side of the speech when trimming")
    trim_silence: bool = Field(False, description="cut leading / trailing silence before generating (else reported)")
    # the output: the generated face pasted back into the portrait
    crop_only: bool = Field(False, description="write the data.resolution face crop only (research), not the portrait")
    feather: float = Field(0.08, gt=0, lt=0.5, description="width of the mask's soft edge, fraction of the crop side")
    colour_match: bool = Field(True, description="match the face's LAB mean / std to the portrait around the seam")
    colour_smoothing: float = Field(
        0.2, gt=0, le=1, description="weight of each new frame in the running colour statistics (1: per frame)")
    crf: int = Field(20, ge=0, le=51, description="H.264 quality (lower is better)")
    # streaming: fragmented MP4 written as clips finish
    fragment_seconds: float = Field(1.0, gt=0, description="--stream: a keyframe and a fragment every this many seconds")
    # the web demo
    demo_host: str = Field("127.0.0.1", description="mcdm demo: the address it binds (loopback by default)")
    demo_max_seconds: float = Field(30.0, gt=0, description="mcdm demo: the longest video one request may ask for")
