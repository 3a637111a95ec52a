"""The standard SyncNet audio-visual offset / confidence algorithm (Chung & Zisserman 2017).

Given per-window video embeddings ``v_t`` and audio embeddings ``a_t`` (t = 0 .. T-1, one window per
video frame), for every candidate shift ``k`` in ``-K .. K``:

    D_k = (1 / T) sum_t || v_t - a_{t+k} ||_2          (a_{t+k} := 0 outside 0 .. T-1, as in the
                                                         reference implementation's zero padding)

    Sync-D = min_k D_k                                   (lower is better)
    Sync-C = median_k D_k - min_k D_k                    (the "confidence"; higher is better)
    AV offset = -argmin_k D_k                            (in video frames)

Sign convention (the reference implementation's): the audio that matches video frame ``t`` sits at
audio frame ``t + k*``, and the offset is ``-k*``. So **a negative offset means the audio lags the
video** (the sound comes after the lips; e.g. audio delayed by 0.32 s at 25 fps gives -8) and a
positive offset means the audio leads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class OffsetResult:
    offset: int  # AV offset in video frames (negative: audio lags video)
    conf: float  # Sync-C = median - min of the per-shift mean distances
    min_dist: float  # Sync-D = min of the per-shift mean distances
    shifts: np.ndarray  # (2K+1,) candidate shifts k = -K .. K (audio index t + k)
    mean_dists: np.ndarray  # (2K+1,) D_k
    frame_dists: np.ndarray  # (T, 2K+1) ||v_t - a_{t+k}||

    @property
    def frame_conf(self) -> np.ndarray:
        """Per-window confidence at the best shift: ``median_k D_k - ||v_t - a_{t+k*}||``."""
        best = int(np.argmin(self.mean_dists))
        return float(np.median(self.mean_dists)) - self.frame_dists[:, best]


def shifted_distances(video_emb: torch.Tensor, audio_emb: torch.Tensor, max_offset: int) -> torch.Tensor:
    """``(T, 2K+1)`` distances ``||v_t - a_{t+k}||`` for ``k = -K .. K``; audio zero-padded at both ends."""
    if video_emb.shape != audio_emb.shape or video_emb.ndim != 2:
        raise ValueError(f"av_offset: embeddings must both be (T, D); got {tuple(video_emb.shape)} "
                         f"and {tuple(audio_emb.shape)}")
    t = video_emb.shape[0]
    padded = torch.nn.functional.pad(audio_emb, (0, 0, max_offset, max_offset))  # (T + 2K, D)
    # row t of the window view holds a_{t-K} .. a_{t+K}: (T, D, 2K+1) -> (T, 2K+1, D)
    windows = padded.unfold(0, 2 * max_offset + 1, 1)[:t].transpose(1, 2)
    return torch.linalg.vector_norm(windows - video_emb[:, None, :], dim=-1)


def av_offset(video_emb, audio_emb, max_offset: int = 15) -> OffsetResult:
    """AV offset, Sync-C and Sync-D of one clip from its ``(T, D)`` video and audio embeddings."""
    v = torch.as_tensor(np.asarray(video_emb) if not torch.is_tensor(video_emb) else video_emb).double()
    a = torch.as_tensor(np.asarray(audio_emb) if not torch.is_tensor(audio_emb) else audio_emb).double()
    if v.shape[0] == 0:
        raise ValueError("av_offset: no windows (clip shorter than 5 frames / 0.2 s of audio)")
    # 1. distance of every video window to the audio window k frames away: (T, 2K+1)
    frame_dists = shifted_distances(v, a, max_offset)
    # 2. D_k: mean over the clip's windows
    mean_dists = frame_dists.mean(dim=0)
    # 3. Sync-D = min_k D_k ; Sync-C = median_k D_k - min_k D_k ; offset = -argmin
    best = int(torch.argmin(mean_dists))
    shifts = np.arange(-max_offset, max_offset + 1)
    min_dist = float(mean_dists[best])
    # torch.median returns the lower middle value for even counts; 2K+1 is odd, so it is the median
    conf = float(torch.median(mean_dists)) - min_dist
    return OffsetResult(
        offset=int(-shifts[best]),
        conf=conf,
        min_dist=min_dist,
        shifts=shifts,
        mean_dists=mean_dists.numpy(),
        frame_dists=frame_dists.numpy(),
    )
