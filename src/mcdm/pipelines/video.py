"""Files in, an mp4 out: a portrait and a speech file (and optionally a driving landmark video) through
:class:`~mcdm.pipelines.mcdm.MCDMPipeline` into an H.264 + AAC mp4 at the portrait's resolution (or the
face crop), written clip by clip as the frames come, with the speech muxed in
(:func:`mcdm.pipelines.render.render` does the work).

    result = generate_video(pipe, "face.png", "speech.wav", "talk.mp4", seconds=10, stream=True)

Every input is checked first, each failure a one-line :class:`~mcdm.errors.McdmError` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from mcdm.config.generation import GenerationSettings
from mcdm.errors import McdmError
from mcdm.pipelines.mcdm import MCDMPipeline
from mcdm.pipelines.preprocessing import read_image, read_speech
from mcdm.pipelines.render import Progress, RenderResult, render


def check_output(path: str | os.PathLike, what: str = "--out") -> Path:
    """An mp4 file name in a writable folder, checked before anything is generated."""
    out = Path(path)
    if out.is_dir():
        raise McdmError(f"{what} {path}: is a folder, not a file name")
    if out.suffix.lower() != ".mp4":
        raise McdmError(f"{what} {path}: the output is an mp4 file (name it *.mp4)")
    folder = out.parent
    if not folder.is_dir():
        raise McdmError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise McdmError(f"{what} {path}: the folder {folder} is not writable")
    return out


def read_inputs(ref: str | os.PathLike, audio: str | os.PathLike, rate: int = 16000,
                seconds: Optional[float] = None, settings: Optional[GenerationSettings] = None) -> tuple[np.ndarray, np.ndarray]:
    """The portrait (RGB uint8) and the speech (``rate`` Hz mono) of two files, or a one-line error.
    Only the speech used is decoded (all of it when leading silence is to be trimmed)."""
    image = read_image(ref)
    trim = settings is not None and settings.trim_silence
    return image, read_speech(audio, rate, seconds=None if trim else seconds)


def generate_video(pipe: MCDMPipeline, ref: str | os.PathLike | np.ndarray, audio: str | os.PathLike | np.ndarray,
                   out: str | os.PathLike, *, settings: Optional[GenerationSettings] = None,
                   seconds: Optional[float] = None, steps: Optional[int] = None, seed: int = 0, stream: bool = False,
                   landmarks: str | os.PathLike | np.ndarray | None = None,
                   progress: Optional[Progress] = None) -> RenderResult:
    """The talking-face video of ``ref`` (an image file or RGB array) speaking ``audio`` (any audio or
    video file, or 16 kHz mono samples) into ``out``; see :func:`mcdm.pipelines.render.render`."""
    check_output(out, "output")
    rate = int(pipe.data_params.audio_rate)
    what = str(ref) if isinstance(ref, (str, os.PathLike)) else "portrait"
    image = read_image(ref) if isinstance(ref, (str, os.PathLike)) else np.asarray(ref, np.uint8)
    if isinstance(audio, (str, os.PathLike)):
        trim = settings is not None and settings.trim_silence
        audio = read_speech(audio, rate, seconds=None if trim else seconds)
    return render(pipe, image, audio, out, settings=settings, seconds=seconds, steps=steps, seed=seed, stream=stream,
                  landmarks=landmarks, progress=progress, what=what)
