"""Planted defects of talkingface-wild-mini, each with the ground truth a later stage is scored on.

A sample video has one ``kind``. ``clean`` and ``long_term`` videos are what the data stages must
keep; every other kind is a defect that some stage must catch (reject, split or trim), named in the
manifest's ``defects`` column with the same word:

=================  ===========================================================  ====================
kind               what is planted                                              the stage that acts
=================  ===========================================================  ====================
scene_cut          two identities back to back, cut at ``scene_cuts`` frames     scenes (split)
too_long           a clean video longer than ``data.max_clip_seconds``           scenes (trim)
no_face_segment    a panel covers the whole frame for >= 1.5 s                   faces (reject/split)
two_faces          two identities side by side in a wide frame                   faces (reject)
blurred            heavy Gaussian blur on every frame                            quality (reject)
low_res            rendered at 48 px and upscaled                                quality (reject)
av_shift           audio shifted by ``audio_shift_s`` (0.3-0.6 s, either sign)   sync_filter (reject)
corrupt            the mp4 truncated to a fraction of its bytes                  ingest (reject)
no_audio           video stream only                                             ingest (reject)
=================  ===========================================================  ====================
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

CLEAN_KINDS = ("clean", "long_term")
DEFECT_KINDS = ("scene_cut", "too_long", "no_face_segment", "two_faces", "blurred", "low_res", "av_shift",
                "corrupt", "no_audio")
KINDS = CLEAN_KINDS + DEFECT_KINDS

# share of the ``n_videos`` regular videos given to each defect (at least one each)
DEFECT_SHARE = {"scene_cut": 0.05, "too_long": 0.025, "no_face_segment": 0.05, "two_faces": 0.05,
                "blurred": 0.05, "low_res": 0.025, "av_shift": 0.05, "corrupt": 0.025, "no_audio": 0.025}

BLUR_SIGMA = 4.0  # pixels at 256 px: variance of the Laplacian drops by two orders of magnitude
LOW_RES_SIDE = 48
SHIFT_RANGE = (0.3, 0.6)  # seconds
NO_FACE_SECONDS = (1.5, 2.5)
COVER_SLIDE_FRAMES = 5
CORRUPT_FRACTION = 0.45


def occluder(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A textured panel (a card held in front of the camera) from scikit-image's brick texture."""
    from skimage import data

    tex = data.brick()  # 512 x 512 grey
    y, x = rng.integers(0, tex.shape[0] - 256, 2)
    tex = cv2.resize(tex[y : y + 256, x : x + 256], (width, height), interpolation=cv2.INTER_LINEAR)
    tint = rng.uniform(0.6, 1.0, 3).astype(np.float32)
    return np.clip(tex[..., None].astype(np.float32) * tint[None, None], 0, 255).astype(np.uint8)


def cover(frame: np.ndarray, panel: np.ndarray, amount: float) -> np.ndarray:
    """The panel slid in from the right by ``amount`` (0 none .. 1 the whole frame)."""
    if amount <= 0:
        return frame
    w = frame.shape[1]
    k = int(round(min(amount, 1.0) * w))
    out = frame.copy()
    out[:, w - k :] = panel[:, :k]
    return out


def cover_amount(n_frames: int, start: int, end: int, slide: int = COVER_SLIDE_FRAMES) -> np.ndarray:
    """Per-frame panel amount: slides in over ``slide`` frames before ``start``, out after ``end``.

    Frames ``start .. end-1`` are fully covered (the manifest's no-face span).
    """
    amount = np.zeros(n_frames, np.float32)
    amount[start:end] = 1.0
    for i in range(1, slide + 1):
        a = 1.0 - i / (slide + 1)
        if start - i >= 0:
            amount[start - i] = a
        if end - 1 + i < n_frames:
            amount[end - 1 + i] = a
    return amount


def blur(frame: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    return cv2.GaussianBlur(frame, (0, 0), sigma)


def low_res(frame: np.ndarray, side: int = LOW_RES_SIDE) -> np.ndarray:
    h, w = frame.shape[:2]
    small = cv2.resize(frame, (max(1, side * w // h), side), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def shift_audio(audio: np.ndarray, seconds: float, rate: int) -> np.ndarray:
    """Delay (``seconds`` > 0: audio lags the video) or advance the audio, keeping its length."""
    k = int(round(abs(seconds) * rate))
    if k == 0:
        return audio
    pad = np.zeros(k, audio.dtype)
    if seconds > 0:
        return np.concatenate([pad, audio[:-k]])
    return np.concatenate([audio[k:], pad])


def truncate(path: Path, fraction: float = CORRUPT_FRACTION) -> None:
    """Cut a file to ``fraction`` of its bytes (a download or copy that stopped half way)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
