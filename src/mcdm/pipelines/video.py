"""Files in, an mp4 out: a portrait and a speech file (and optionally a driving landmark video) through
:class:`~mcdm.pipelines.mcdm.MCDMPipeline` into an H.264 + AAC mp4, written clip by clip as frames
come (no frame is kept in memory), with the speech muxed in."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mcdm.errors import McdmError
from mcdm.media.io import MediaError, write_video
from mcdm.pipelines.mcdm import MCDMPipeline, MCDMPipelineOutput
from mcdm.pipelines.preprocessing import crop_portrait, driving_landmarks, read_image, read_speech


def generate_video(
    pipe: MCDMPipeline,
    ref_image: str | os.PathLike | np.ndarray,
    audio: str | os.PathLike | np.ndarray,
    output_path: str | os.PathLike,
    seconds: Optional[float] = None,
    landmarks: str | os.PathLike | np.ndarray | None = None,
    num_inference_steps: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    crop_face: bool = True,
    ref_landmarks: Optional[np.ndarray] = None,
    eta: float = 0.0,
) -> MCDMPipelineOutput:
    """Generate the talking-face video of a portrait into ``output_path`` (mp4).

    ``ref_image``: an image file or an RGB array (cropped as the faces stage crops training clips;
    ``crop_face=False``: already a ``data.resolution`` crop, ``ref_landmarks`` its (68, 2) landmarks);
    ``audio``: any audio / video file, or 16 kHz mono float samples; ``landmarks``: an optional driving
    video (tracked like the faces stage) or (T, 68, 2) crop-pixel landmarks.
    """
    data = pipe.data_params
    rate = int(data.audio_rate)
    if isinstance(audio, (str, os.PathLike)):
        audio = read_speech(audio, rate)
    segment, n_frames = pipe.prepare_speech(audio, seconds)
    image = read_image(ref_image) if isinstance(ref_image, (str, os.PathLike)) else np.asarray(ref_image, np.uint8)
    if crop_face:
        portrait = crop_portrait(image, data)
        image, ref_landmarks = portrait.image, portrait.landmarks
    if isinstance(landmarks, (str, os.PathLike)):
        landmarks = driving_landmarks(landmarks, data, n_frames).landmarks
    frames = pipe.iter_frames(image, segment, n_frames, ref_landmarks, landmarks, num_inference_steps, generator, eta)
    try:
        write_video(output_path, frames, fps=pipe.fps, audio=segment, audio_rate=rate)
    except (MediaError, ValueError, OSError) as err:
        raise McdmError(f"{output_path}: cannot write the video ({str(err).splitlines()[0]})") from None
    return MCDMPipelineOutput(frames=None, path=str(Path(output_path)), n_frames=n_frames, fps=pipe.fps)
