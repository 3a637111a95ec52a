"""Inputs of long-term generation, prepared exactly as the data stages prepared the training clips.

- ``read_image`` / ``read_speech``: the user's portrait and speech, or a one-line error naming the file;
- ``crop_portrait``: dlib finds the face in the portrait, the square crop is ``data.crop_scale`` x the
  face box side around its centre, resized to ``data.resolution`` -- the faces stage's own
  ``crop_boxes`` / ``crop_square`` on a one-frame track -- and the 68 landmarks come in crop pixels,
  so the reference seen at inference is framed like the reference frames seen in training;
- ``driving_landmarks``: the optional landmark video, tracked like the faces stage (detection on every
  ``data.face_sample_every``-th frame, interpolated and smoothed boxes, the square crop of the track,
  68 landmarks per frame in crop pixels, smoothed) plus the head pose fitted to them. Two streamed
  passes over the video; only the landmark track (T x 68 x 2 floats) is kept.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy.ndimage import gaussian_filter1d

from mcdm.config import DataParams
from mcdm.errors import McdmError
from mcdm.face.dlib import DlibFace, Face
from mcdm.face.geometry import head_pose_from_landmarks
from mcdm.face.tracks import (
    TrackSettings,
    crop_boxes,
    crop_square,
    detection_scale,
    sample_faces,
    to_crop_coords,
    track_boxes,
)
from mcdm.media.io import MediaError, iter_frames, read_audio

MAX_IMAGE_PIXELS = 40_000_000  # 40 MP: more than any portrait photo; a larger header is refused before decoding


@dataclass
class PortraitCrop:
    image: np.ndarray  # (S, S, 3) uint8, S = data.resolution
    landmarks: np.ndarray  # (68, 2) float32, crop pixels
    face_box: tuple[float, float, float, float]  # l, t, r, b in source pixels
    n_faces: int  # faces dlib found in the portrait (the most confident one is used)
    square: tuple[int, int, int, int] = (0, 0, 0, 0)  # l, t, r, b of the crop in source pixels (paste-back)


@dataclass
class DrivingTrack:
    landmarks: np.ndarray  # (T, 68, 2) float32, crop pixels
    head_pose: np.ndarray  # (T, 6) float32 (pitch, yaw, roll, tx, ty, tz)
    detect_rate: float  # fraction of sampled frames with exactly one face


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file; McdmError naming the file when it cannot be read. The header
    is checked before any pixel is decoded: an image over ``MAX_IMAGE_PIXELS`` (a decompression bomb: a
    few KB claiming 20000 x 20000) is refused."""
    path = Path(path)
    if not path.is_file():
        raise McdmError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # reads the header only
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise McdmError(f"{path}: the image is {width}x{height} ({width * height / 1e6:.0f} MP), over the "
                                    f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP a portrait may have")
                rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise McdmError(f"{path}: cannot read the image ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    if rgb.ndim != 3 or min(rgb.shape[:2]) < 8:
        raise McdmError(f"{path}: image is too small ({rgb.shape[1]}x{rgb.shape[0]})")
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def read_speech(path: str | os.PathLike, rate: int = 16000, seconds: float | None = None) -> np.ndarray:
    """Float32 mono audio at ``rate`` from any audio or video file (only its first ``seconds`` + 1 s are
    decoded when given); McdmError when it does not decode or is empty."""
    path = Path(path)
    if not path.is_file():
        raise McdmError(f"{path}: no such audio file")
    try:
        audio = read_audio(path, rate=rate, end=None if seconds is None else seconds + 1.0)
    except MediaError as err:
        if "empty audio" in str(err):
            raise McdmError(f"{path}: the audio is empty") from None
        raise McdmError(f"{path}: audio does not decode ({err})") from None
    if audio.size == 0 or audio.size < rate // 100:
        raise McdmError(f"{path}: the audio is empty")
    if not np.isfinite(audio).all():
        raise McdmError(f"{path}: the audio holds NaN or inf samples")
    return audio


def detect_faces(image: np.ndarray, data: DataParams):
    """dlib faces of an RGB image (source pixels, best first), with the faces stage's detection scale
    (a ``data.min_face_px`` face fills HOG's window, the image is at most ``data.detect_max_side``)."""
    h, w = image.shape[:2]
    scale = detection_scale(h, w, TrackSettings.from_data(data))
    small = image if scale == 1 else cv2.resize(
        image, (max(1, round(w * scale)), max(1, round(h * scale))),
        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    face = DlibFace()
    found = face.detect(small) or face.detect(small, upsample=1)
    return face, [Face(tuple(v / scale for v in f.box), f.score) for f in found]


def crop_portrait(image: np.ndarray, data: DataParams, what: str = "reference image") -> PortraitCrop:
    """The talking-head crop of a portrait, framed as the faces stage frames training clips."""
    face, faces = detect_faces(image, data)
    if not faces:
        raise McdmError(f"{what}: no face found in the image")
    box = np.asarray(faces[0].box, np.float32)
    h, w = image.shape[:2]
    square = crop_boxes(box[None], h, w, data.crop_scale)[0]
    crop = crop_square(image, square, data.resolution)
    landmarks = to_crop_coords(face.landmarks(image, tuple(int(round(v)) for v in box)), square, data.resolution)
    return PortraitCrop(crop, landmarks.astype(np.float32), tuple(float(v) for v in box), len(faces),
                        tuple(int(v) for v in square))


def driving_landmarks(path: str | os.PathLike, data: DataParams, n_frames: int) -> DrivingTrack:
    """Landmark track (crop pixels) and head pose of the first ``n_frames`` frames of a driving video.

    Raises McdmError when the video does not decode, holds no face, or is shorter than ``n_frames``.
    """
    path = Path(path)
    if not path.is_file():
        raise McdmError(f"{path}: no such landmark video")
    settings = TrackSettings.from_data(data)
    detector = DlibFace()
    try:
        # 1. sampled detections -> smoothed boxes -> the square crop of every frame (faces stage)
        samples, n, (height, width) = sample_faces((img for _, img in iter_frames(path, fps=data.fps)), settings, detector)
        good = [s for s in samples if s.status == "one"]
        if not good:
            raise McdmError(f"{path}: no single face found in the landmark video")
        if n < n_frames:
            raise McdmError(f"{path}: the landmark video has {n} frames ({n / data.fps:.2f} s), fewer than the "
                            f"{n_frames} to generate (shorten with --seconds)")
        boxes = track_boxes(samples, 0, n_frames, settings)
        squares = crop_boxes(boxes, height, width, data.crop_scale)
        # 2. 68 landmarks on every frame, in crop pixels
        marks = np.zeros((n_frames, 68, 2), np.float32)
        count = 0
        for i, (_, img) in enumerate(iter_frames(path, fps=data.fps)):
            if i >= n_frames:
                break
            marks[i] = to_crop_coords(detector.landmarks(img, tuple(boxes[i])), squares[i], data.resolution)
            count = i + 1
    except MediaError as err:
        raise McdmError(f"{path}: landmark video does not decode ({err})") from None
    if count < n_frames:
        raise McdmError(f"{path}: decoded {count} of {n_frames} frames of the landmark video")
    if data.landmark_smooth_frames > 0 and n_frames > 1:
        marks = gaussian_filter1d(marks, data.landmark_smooth_frames, axis=0, mode="nearest").astype(np.float32)
    head_pose = head_pose_from_landmarks(marks, data.resolution)
    return DrivingTrack(marks, np.asarray(head_pose, np.float32), len(good) / max(len(samples), 1))
