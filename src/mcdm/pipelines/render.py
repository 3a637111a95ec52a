"""One talking-face video from a portrait and a speech track: what ``mcdm generate``, the web demo and the
served MLflow model all call.

    result = render(pipe, portrait_rgb, speech_16k, "talk.mp4", settings=GenerationSettings())

The speech is prepared as :mod:`mcdm.pipelines.speech` says, the face of the portrait is cropped as
the faces stage crops training clips, the pipeline generates crop after crop, and each generated crop
is pasted back into the portrait (:class:`mcdm.face.paste.FacePaster`: feathered ellipse, colours
matched around the seam), so the video has the portrait's resolution (one pixel less on an odd side:
H.264's 4:2:0 needs even sides). ``crop_only`` writes the crops themselves (research).

``stream=True`` writes a fragmented MP4 in place as the clips finish (:mod:`mcdm.media.stream`):
the file plays while it grows; the result says when its first playable fragment reached the disk
(time to first frame) and the real-time factor (wall seconds of generation per second of video, so
below 1 is faster than real time).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from mcdm.config.generation import GenerationSettings
from mcdm.errors import McdmError
from mcdm.face.paste import FacePaster
from mcdm.media.io import MediaError, write_video
from mcdm.media.loudness import SpeechReport
from mcdm.media.stream import FragmentedMp4
from mcdm.pipelines.mcdm import MCDMPipeline
from mcdm.pipelines.preprocessing import PortraitCrop, crop_portrait, driving_landmarks
from mcdm.pipelines.speech import prepare_user_speech

Progress = Callable[[int, int], None]  # (frames done, frames in all)


@dataclass
class RenderResult:
    path: str
    n_frames: int
    fps: float
    width: int
    height: int
    crop_only: bool
    speech: SpeechReport
    n_faces: int
    generate_seconds: float  # wall time from the first network call to the closed file
    first_frame_seconds: Optional[float]  # stream: when the first playable fragment was on disk
    streamed: bool

    @property
    def video_seconds(self) -> float:
        return self.n_frames / self.fps

    @property
    def real_time_factor(self) -> float:
        return self.generate_seconds / self.video_seconds

    def line(self) -> str:
        kind = "face crop" if self.crop_only else "full frame"
        text = (f"wrote {self.path}: {self.n_frames} frames ({self.video_seconds:.2f} s at {self.fps:g} fps, audio "
                f"muxed), {self.width}x{self.height} {kind}")
        if self.streamed:
            text += (f"; streamed: first playable fragment after {self.first_frame_seconds:.2f} s, real-time factor "
                     f"{self.real_time_factor:.2f} (generation s per video s)")
        return text

    def as_dict(self) -> dict:
        return {"path": self.path, "n_frames": self.n_frames, "fps": self.fps, "width": self.width,
                "height": self.height, "crop_only": self.crop_only, "n_faces": self.n_faces,
                "generate_seconds": round(self.generate_seconds, 3), "streamed": self.streamed,
                "first_frame_seconds": None if self.first_frame_seconds is None else round(self.first_frame_seconds, 3),
                "real_time_factor": round(self.real_time_factor, 4), "speech": self.speech.as_dict()}


def _frames(pipe: MCDMPipeline, portrait: PortraitCrop, features: np.ndarray, n_frames: int, landmarks,
            steps: Optional[int], seed: int, progress: Optional[Progress]) -> Iterator[np.ndarray]:
    generator = torch.Generator().manual_seed(int(seed))
    frames = pipe.iter_frames(portrait.image, features, n_frames, portrait.landmarks, landmarks, steps, generator)
    for i, frame in enumerate(frames):
        if progress is not None:
            progress(i + 1, n_frames)
        yield frame


def render(pipe: MCDMPipeline, image: np.ndarray, audio: np.ndarray, out: str | os.PathLike, *,
           settings: Optional[GenerationSettings] = None, seconds: Optional[float] = None,
           steps: Optional[int] = None, seed: int = 0, stream: bool = False,
           landmarks: str | os.PathLike | np.ndarray | None = None, progress: Optional[Progress] = None,
           what: str = "portrait", portrait: Optional[PortraitCrop] = None) -> RenderResult:
    """``image``: the portrait, RGB uint8 (H, W, 3); ``audio``: 16 kHz mono speech as read; ``out``: the
    mp4. ``portrait``: its crop when the caller already made it (else found here)."""
    settings = settings or GenerationSettings()
    speech = prepare_user_speech(pipe, audio, settings, seconds)
    if portrait is None:
        portrait = crop_portrait(image, pipe.data_params, what=what)
    if isinstance(landmarks, (str, os.PathLike)):
        landmarks = driving_landmarks(landmarks, pipe.data_params, speech.n_frames).landmarks
    frames = _frames(pipe, portrait, speech.features, speech.n_frames, landmarks, steps, seed, progress)
    if not settings.crop_only:
        paster = FacePaster(image, portrait.square, settings.feather, settings.colour_match, settings.colour_smoothing)
        frames = (paster(crop) for crop in frames)
        width, height = paster.size
    else:
        width = height = pipe.data_params.resolution
    rate, started, first = int(pipe.data_params.audio_rate), time.perf_counter(), None
    try:
        if stream:
            with FragmentedMp4(out, pipe.fps, speech.track, rate, settings.fragment_seconds, settings.crf) as writer:
                for frame in frames:
                    writer.add(frame)
            first = writer.first_fragment_seconds
        else:
            write_video(out, frames, fps=pipe.fps, audio=speech.track, audio_rate=rate, crf=settings.crf)
    except (MediaError, ValueError, OSError) as err:
        raise McdmError(f"{out}: cannot write the video ({str(err).splitlines()[0]})") from None
    return RenderResult(str(Path(out)), speech.n_frames, pipe.fps, width - width % 2, height - height % 2,
                        settings.crop_only, speech.report, portrait.n_faces, time.perf_counter() - started, first,
                        stream)
