"""Sync scores of one talking-face clip: AV offset, Sync-C (confidence) and Sync-D (min distance).

One function serves the ``sync_filter`` data stage and the Sync-C / Sync-D metrics of evaluation:

    scores = sync_scores(frames, audio, landmarks, model=load_syncnet(path))   # arrays: frames at 25 fps, 16 kHz audio
    # {"av_offset": -8, "sync_conf": 0.61, "sync_dist": 0.72, "n_windows": 196, "sync_backend": ...}

Steps: (1) frames -> the network's video input (grayscale mouth crops for the SyncNet trained here,
224 px BGR face crops for the official one), (2) audio -> 13 x 100 Hz MFCCs, (3) one embedding per
5-frame / 20-MFCC window, (4) the standard offset search of ``mcdm.models.sync.offset.av_offset``.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from mcdm.models.sync.mfcc import WINDOW_FRAMES, mfcc, mfcc_windows, n_windows
from mcdm.models.sync.offset import OffsetResult, av_offset
from mcdm.models.sync.syncnet import OfficialSyncNet, SyncNet

SYNC_FPS = 25.0  # SyncNet's clock: 4 MFCC frames (10 ms) per video frame
MOUTH = slice(48, 68)  # iBUG 68-landmark mouth points
MOUTH_BOX_SCALE = 1.8  # box width = 1.8 x the clip's median mouth width
CENTER_SMOOTH = 5  # frames of moving average on the mouth centre


def backend_name(model: SyncNet | OfficialSyncNet) -> str:
    return "syncnet_official" if isinstance(model, OfficialSyncNet) else "syncnet_trained"


def _gray(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) RGB uint8 -> (T, H, W) float32 luma (ITU-R BT.601)."""
    return frames[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def mouth_boxes(landmarks: np.ndarray | None, height: int, width: int, aspect: float) -> np.ndarray:
    """Per-frame mouth box ``(T, 4)`` as ``cx, cy, box_w, box_h`` in crop pixels.

    With 68 landmarks: centred on the mouth points (moving average over 5 frames), one size per clip
    (1.8 x the median mouth width, ``box_h = aspect * box_w``). Without: the lower half of the crop.
    """
    if landmarks is None:
        box_w = 0.6 * width
        return np.array([[width / 2, 0.72 * height, box_w, min(aspect * box_w, 0.45 * height)]], np.float32)
    mouth = np.asarray(landmarks, np.float32)[:, MOUTH]  # (T, 20, 2)
    centre = mouth.mean(axis=1)  # (T, 2)
    if len(centre) >= CENTER_SMOOTH:
        kernel = np.ones(CENTER_SMOOTH, np.float32) / CENTER_SMOOTH
        padded = np.pad(centre, ((CENTER_SMOOTH // 2, CENTER_SMOOTH // 2), (0, 0)), mode="edge")
        centre = np.stack([np.convolve(padded[:, i], kernel, mode="valid") for i in range(2)], axis=1)
    box_w = max(float(np.median(np.ptp(mouth[..., 0], axis=1))) * MOUTH_BOX_SCALE, 6.0)
    sizes = np.broadcast_to(np.array([box_w, aspect * box_w], np.float32), centre.shape)
    return np.concatenate([centre, sizes], axis=1)


def mouth_crops(frames: np.ndarray, landmarks: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """``(T, h, w)`` float32 grayscale mouth crops in [0, 1] from ``(T, H, W, 3)`` RGB face crops.

    ``size = (h, w)``; the box follows ``mouth_boxes`` (border pixels are replicated where it leaves
    the frame). ``landmarks`` ``(T, 68, 2)`` in crop coordinates, or None for the lower-half box.
    """
    h, w = size
    gray = _gray(frames)
    if landmarks is not None and len(landmarks) != len(frames):
        n = min(len(landmarks), len(frames))
        gray, landmarks = gray[:n], np.asarray(landmarks)[:n]
    boxes = mouth_boxes(landmarks, gray.shape[1], gray.shape[2], aspect=h / w)
    out = np.empty((len(gray), h, w), np.float32)
    for t, img in enumerate(gray):
        cx, cy, bw, bh = boxes[min(t, len(boxes) - 1)]
        patch = cv2.getRectSubPix(img, (max(int(round(bw)), 2), max(int(round(bh)), 2)), (float(cx), float(cy)))
        out[t] = cv2.resize(patch, (w, h), interpolation=cv2.INTER_AREA)
    return out / 255.0


def official_faces(frames: np.ndarray, size: int = 224) -> np.ndarray:
    """``(T, 3, size, size)`` uint8 BGR face crops, the official SyncNet's input (values 0..255)."""
    out = np.empty((len(frames), 3, size, size), np.uint8)
    for t, img in enumerate(frames):
        out[t] = cv2.resize(img[..., ::-1], (size, size), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    return out


def video_input(model: SyncNet | OfficialSyncNet, frames: np.ndarray, landmarks: np.ndarray | None) -> np.ndarray:
    """Per-frame network input: ``(T, 1, h, w)`` mouth crops or ``(T, 3, 224, 224)`` BGR faces."""
    if model.input_kind == "mouth":
        return mouth_crops(frames, landmarks, (model.config.mouth_height, model.config.mouth_width))[:, None]
    return official_faces(frames, model.config.image_size)


def audio_features(model: SyncNet | OfficialSyncNet, audio: np.ndarray) -> np.ndarray:
    """``(13, M)`` MFCCs at 100 Hz; the official network expects int16-scaled samples."""
    scale = model.config.audio_scale if model.input_kind == "face224" else 1.0
    return mfcc(np.asarray(audio, np.float32) * scale)


def video_windows(per_frame: np.ndarray, starts: np.ndarray) -> torch.Tensor:
    """``(B, C, 5, h, w)`` windows of 5 consecutive frames starting at ``starts`` (layout B C F H W)."""
    idx = np.asarray(starts)[:, None] + np.arange(WINDOW_FRAMES)
    return torch.from_numpy(np.ascontiguousarray(per_frame[idx].transpose(0, 2, 1, 3, 4))).float()


@torch.no_grad()
def embed_clip(model: SyncNet | OfficialSyncNet, per_frame: np.ndarray, cep: np.ndarray,
               batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Video and audio embeddings ``(N, D)`` of every complete window of one clip."""
    n = n_windows(len(per_frame), cep.shape[1])
    if n <= 0:
        raise ValueError(f"clip too short for SyncNet: {len(per_frame)} frames, {cep.shape[1]} MFCC frames "
                         f"(needs >= {WINDOW_FRAMES} frames and 0.2 s of audio)")
    device = model.device
    video, audio = [], []
    for s in range(0, n, batch_size):
        starts = np.arange(s, min(s + batch_size, n))
        video.append(model.embed_video(video_windows(per_frame, starts).to(device)).float().cpu())
        audio.append(model.embed_audio(torch.from_numpy(mfcc_windows(cep, starts)).to(device)).float().cpu())
    return torch.cat(video), torch.cat(audio)


def _check_inputs(frames: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"sync_scores: frames must be (T, H, W, 3) RGB; got {frames.shape}")
    return frames, np.asarray(audio, np.float32).reshape(-1)


def sync_result(frames: np.ndarray, audio: np.ndarray, landmarks: np.ndarray | None = None, *,
                model: SyncNet | OfficialSyncNet,
                max_offset: int = 15) -> OffsetResult:
    """The full offset search of one clip (per-shift and per-window distances included).

    ``frames``: ``(T, H, W, 3)`` RGB uint8 at 25 fps; ``audio``: 16 kHz mono float samples;
    ``landmarks``: ``(T, 68, 2)`` crop-pixel landmarks, or None (the lower half of the crop).
    """
    frames, audio = _check_inputs(frames, audio)
    video_emb, audio_emb = embed_clip(model, video_input(model, frames, landmarks), audio_features(model, audio))
    return av_offset(video_emb, audio_emb, max_offset=max_offset)


def sync_scores(frames: np.ndarray, audio: np.ndarray, landmarks: np.ndarray | None = None, *,
                model: SyncNet | OfficialSyncNet,
                max_offset: int = 15) -> dict:
    """``{"av_offset", "sync_conf" (Sync-C), "sync_dist" (Sync-D), "n_windows", "sync_backend"}``."""
    result = sync_result(frames, audio, landmarks, model=model, max_offset=max_offset)
    return {
        "av_offset": result.offset,
        "sync_conf": result.conf,
        "sync_dist": result.min_dist,
        "n_windows": int(result.frame_dists.shape[0]),
        "sync_backend": backend_name(model),
    }
