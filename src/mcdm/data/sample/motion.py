"""Per-video motion tracks: the ground truth a sample video is rendered from.

Given the mouth opening (from the speech) and a random generator, draws blinks, head rotation and
translation (smooth random walks, a nod now and then with stressed speech) and occasional
expressions (smile, brow raise). The arrays are saved beside the video as its ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from mcdm.data.sample.animate import FrameState


@dataclass
class MotionTrack:
    mouth_open: np.ndarray  # (T,) [0, 1]
    blink: np.ndarray  # (T,) [0, 1]
    head_pose: np.ndarray  # (T, 5): yaw, pitch, roll (degrees), tx, ty (pixels)
    smile: np.ndarray  # (T,) [0, 1]
    brow: np.ndarray  # (T,) [0, 1] brow raise
    envelope: np.ndarray  # (T,) speech envelope per frame

    FIELDS = ("mouth_open", "blink", "head_pose", "smile", "brow", "envelope")

    def __len__(self) -> int:
        return len(self.mouth_open)

    @property
    def expression(self) -> np.ndarray:
        """(T,) int8 label: 0 neutral, 1 smile, 2 brow raise (the expression at >= 0.35 intensity)."""
        label = np.zeros(len(self), np.int8)
        label[self.smile >= 0.35] = 1
        label[self.brow >= 0.35] = 2
        return label

    def state(self, f: int) -> FrameState:
        yaw, pitch, roll, tx, ty = (float(v) for v in self.head_pose[f])
        return FrameState(
            mouth=float(self.mouth_open[f]), blink=float(self.blink[f]),
            smile=float(self.smile[f]), brow=float(self.brow[f]),
            yaw=yaw, pitch=pitch, roll=roll, tx=tx, ty=ty,
        )

    def truth(self) -> dict[str, np.ndarray]:
        """The arrays of ``truth/<video_id>.npz``."""
        return {
            "mouth_open": self.mouth_open.astype(np.float32),
            "blink": self.blink.astype(np.float32),
            "head_pose": self.head_pose.astype(np.float32),
            "expression": self.expression.astype(np.int8),
            "envelope": self.envelope.astype(np.float32),
        }

    def slice(self, start: int, end: int) -> "MotionTrack":
        return MotionTrack(*(getattr(self, k)[start:end] for k in self.FIELDS))


def _smooth_walk(rng: np.random.Generator, n: int, sigma_frames: float, std: float) -> np.ndarray:
    x = gaussian_filter1d(rng.standard_normal(n + 200), sigma_frames, mode="reflect")[100:-100]
    return (x / (x.std() + 1e-9) * std).astype(np.float32)


BLINK_PROFILE = np.float32([0.35, 0.85, 1.0, 0.8, 0.4, 0.1])


def make_track(rng: np.random.Generator, mouth: np.ndarray, env: np.ndarray, fps: float = 25.0,
               head_scale: float = 1.0, expressive: float = 1.0) -> MotionTrack:
    """Motion for ``len(mouth)`` frames: blinks every 2-6 s, smooth head motion, 0-2 expressions per 10 s."""
    n = len(mouth)
    # blinks: renewal process with 2-6 s gaps, fixed 6-frame profile
    blink = np.zeros(n, np.float32)
    t = int(rng.uniform(0.3, 2.5) * fps)
    while t < n:
        seg = BLINK_PROFILE[: n - t]
        blink[t : t + len(seg)] = np.maximum(blink[t : t + len(seg)], seg)
        t += int(rng.uniform(2.0, 6.0) * fps)
    # head: slow random walks (degrees / pixels), plus small nods following speech loudness
    s = head_scale
    yaw = _smooth_walk(rng, n, 14, 4.5 * s)
    pitch = _smooth_walk(rng, n, 12, 2.5 * s) + 2.0 * s * gaussian_filter1d(env - env.mean(), 3)
    roll = _smooth_walk(rng, n, 18, 2.5 * s)
    tx = _smooth_walk(rng, n, 20, 4.0 * s)
    ty = _smooth_walk(rng, n, 20, 2.5 * s)
    pose = np.stack([np.clip(yaw, -13, 13), np.clip(pitch, -9, 9), np.clip(roll, -8, 8),
                     np.clip(tx, -12, 12), np.clip(ty, -9, 9)], 1)
    # expressions: events of 1-2.5 s with 0.3 s ramps
    amounts = np.zeros((3, n), np.float32)  # neutral (unused), smile, brow raise
    n_events = rng.poisson(expressive * n / fps / 8.0)
    for _ in range(n_events):
        length = int(rng.uniform(1.0, 2.5) * fps)
        if length >= n:
            continue
        start = int(rng.integers(0, n - length))
        if amounts[:, start : start + length].any():
            continue
        kind = int(rng.integers(1, 3))
        ramp = max(int(0.3 * fps), 1)
        env_ = np.ones(length, np.float32)
        env_[:ramp] = np.linspace(0, 1, ramp)
        env_[-ramp:] = np.linspace(1, 0, ramp)
        peak = float(rng.uniform(0.7, 1.0))
        amounts[kind, start : start + length] = env_ * peak
    return MotionTrack(mouth.astype(np.float32), blink, pose.astype(np.float32), amounts[1], amounts[2],
                       env.astype(np.float32))
