"""Feature extractors behind the Fréchet metrics, each with the backend label reported beside its value.

TorchScript detectors given by local path (``torch.jit.load``, no torchvision, nothing downloaded):
=====================  ==========================================================================
``InceptionFeatures``  the StyleGAN-family ``inception-2015-12-05.pt``: ``detector(img, return_
                       features=True)``, img uint8 ``(N, 3, H, W)`` in [0, 255] (it resizes to 299
                       itself) -> ``(N, 2048)`` pool3 features. FID.
``I3DFeatures``        StyleGAN-V's ``i3d_torchscript.pt``: ``detector(video, rescale=True,
                       resize=True, return_features=True)``, video uint8 ``(N, 3, 16, H, W)`` in
                       [0, 255] (rescale maps it to [-1, 1], resize to 224) -> ``(N, 400)``
                       pre-softmax features, as StyleGAN-V's ``compute_fvd``. FVD.
``Deep3DExpression``   a TorchScript export of Deep3DFaceRecon's R-Net: ``net(img)``, img float
                       ``(N, 3, 224, 224)`` RGB in [0, 1] -> ``(N, 257)`` coefficients; the 64
                       expression coefficients are ``[80:144]``. E-FID.
=====================  ==========================================================================

Fallbacks that need no downloaded weights (dlib's shipped, pretrained face models):
- ``dlib-descriptor-128`` (FID): the 128-d ResNet face descriptor of each frame's face.
- ``landmark-expression-offsets`` (E-FID): 68 landmarks Procrustes-aligned (rotation, scale,
  translation, fitted on the rigid nose + eye points) to a canonical mean template, minus that
  template, on the mouth, brow and eye points: 84 numbers per frame in inter-ocular-distance units.
  In-plane pose is removed exactly; out-of-plane head rotation is not (2-D landmarks).
- ``fvd-fallback:dlib-descriptor+landmark-dynamics`` (FVD): per 16-frame clip, appearance (mean and
  std over the clip of the face descriptor), motion (amplitude spectra of the frame-to-frame
  velocities of mouth / eye / brow / head-pose signals from the landmarks), the clip's mean of those
  signals, and the spectrum of the frame-difference energy. Identical clips give identical features;
  temporally shuffled frames keep the appearance part but put velocity energy at high frequencies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from mcdm.errors import McdmError


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def as_frames(frames, what: str = "frames") -> np.ndarray:
    """``(N, H, W, 3)`` uint8 from an array / tensor of that layout, one ``(H, W, 3)`` frame, or a
    sequence of frames or of ``(T, H, W, 3)`` videos (concatenated)."""
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        arr = _to_numpy(frames)
    else:
        parts = [_to_numpy(f) for f in frames]
        if not parts:
            raise McdmError(f"{what}: empty")
        parts = [p[None] if p.ndim == 3 else p for p in parts]
        if len({p.shape[1:] for p in parts}) > 1:
            raise McdmError(f"{what}: frames differ in size ({sorted({p.shape[1:] for p in parts})})")
        arr = np.concatenate(parts)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise McdmError(f"{what}: expected RGB frames (N, H, W, 3); got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise McdmError(f"{what}: expected uint8 frames in [0, 255]; got {arr.dtype}")
    if len(arr) == 0:
        raise McdmError(f"{what}: empty")
    return arr


def as_videos(videos, what: str = "videos") -> list[np.ndarray]:
    """A list of ``(T, H, W, 3)`` uint8 videos from a ``(N, T, H, W, 3)`` array or a sequence."""
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        arr = _to_numpy(videos)
        if arr.ndim == 4:
            arr = arr[None]
        videos = list(arr)
    out = [as_frames(v, f"{what}[{i}]") for i, v in enumerate(videos)]
    if not out:
        raise McdmError(f"{what}: empty")
    return out


def split_clips(videos: Sequence[np.ndarray], clip_frames: int) -> tuple[list[np.ndarray], list[tuple[int, int]], int]:
    """Non-overlapping ``clip_frames``-frame clips of every video (stride = clip length).

    Returns (clips, (video index, start frame) of each, number of videos shorter than one clip).
    """
    clips, where, short = [], [], 0
    for i, video in enumerate(videos):
        n = len(video) // clip_frames
        short += n == 0
        for k in range(n):
            clips.append(video[k * clip_frames:(k + 1) * clip_frames])
            where.append((i, k * clip_frames))
    return clips, where, short


def load_torchscript(path: str | Path, key: str) -> torch.jit.ScriptModule:
    """``torch.jit.load`` a local file; ``key`` names the params entry in errors."""
    path = Path(path)
    if not path.is_file():
        raise McdmError(f"{key}: {path} not found")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise McdmError(f"{key}: {path} is not a TorchScript file ({str(err).strip().splitlines()[0]})") from None
    return module.eval()


class TorchScriptDetector:
    """A TorchScript feature detector with its call convention; ``label`` names the backend."""

    kind = "torchscript"
    key = "eval"
    kwargs: dict = {}
    batch_size = 16

    def __init__(self, path: str | Path, device: torch.device | str | None = None, batch_size: int | None = None):
        self.path = Path(path)
        self.device = torch.device(device or "cpu")
        self.module = load_torchscript(self.path, self.key).to(self.device)
        self.batch_size = batch_size or self.batch_size

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.path.name}"

    def run(self, batch: torch.Tensor) -> np.ndarray:
        """One forward pass with the detector's keyword convention -> (B, D) float64."""
        try:
            with torch.inference_mode():
                out = self.module(batch.to(self.device), **self.kwargs)
        except (RuntimeError, torch.jit.Error) as err:  # TorchScript's own exception is not a RuntimeError
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise McdmError(
                f"{self.key}: {self.path.name} failed on input {tuple(batch.shape)} {batch.dtype} with "
                f"{self.kwargs}: {lines[-1] if lines else type(err).__name__}"
            ) from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise McdmError(f"{self.key}: {self.path.name} returned {got}; expected ({batch.shape[0]}, D) features")
        return out.detach().to("cpu", torch.float64).numpy()

    def _batches(self, items: Sequence, desc: str) -> Iterable[Sequence]:
        starts = range(0, len(items), self.batch_size)
        for s in tqdm(starts, desc=desc, leave=False, disable=None if len(starts) > 4 else True):
            yield items[s:s + self.batch_size]


class InceptionFeatures(TorchScriptDetector):
    """2048-d Inception-v3 pool3 features of frames (FID)."""

    kind = "inception-v3-2048"
    key = "eval.inception_path"
    kwargs = {"return_features": True}
    batch_size = 32

    def __call__(self, frames) -> np.ndarray:
        frames = as_frames(frames)
        feats = [self.run(torch.from_numpy(rearrange(b, "n h w c -> n c h w").copy())) for b in self._batches(frames, "inception")]
        return np.concatenate(feats)


class I3DFeatures(TorchScriptDetector):
    """400-d I3D features of 16-frame clips (FVD), StyleGAN-V's ``compute_fvd`` convention."""

    kind = "i3d-400"
    key = "eval.i3d_path"
    kwargs = {"rescale": True, "resize": True, "return_features": True}
    batch_size = 4

    def __call__(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """``clips``: (T, H, W, 3) uint8 clips of one size (an (N, T, H, W, 3) array or a list),
        stacked one batch at a time."""
        shapes = {(np.asarray(c).dtype, np.asarray(c).shape) for c in clips}
        if len(shapes) != 1 or next(iter(shapes))[0] != np.uint8 or len(next(iter(shapes))[1]) != 4:
            raise McdmError(f"{self.key}: clips must be uint8 (T, H, W, 3) of one size; got {sorted(map(str, shapes))[:3]}")
        feats = [self.run(torch.from_numpy(rearrange(np.stack(b), "n t h w c -> n c t h w").copy()))
                 for b in self._batches(clips, "i3d")]
        return np.concatenate(feats)


DEEP3D_EXPRESSION = slice(80, 144)  # Deep3DFaceRecon coefficients: id 80 | exp 64 | tex 80 | angle 3 | gamma 27 | trans 3
DEEP3D_SIZE = 224
DEEP3D_CROP_SCALE = 1.6  # crop side = 1.6 x the 68-landmark box side


def deep3d_crop(frame: np.ndarray, landmarks: np.ndarray, size: int = DEEP3D_SIZE) -> np.ndarray:
    """Square crop around the 68 landmarks, resized to ``size`` (an approximation of Deep3DFaceRecon's
    5-point ``align_img``, whose BFM landmark template is not available here)."""
    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    centre = (lo + hi) / 2
    side = DEEP3D_CROP_SCALE * float(max(hi - lo))
    s = size / side
    warp = np.array([[s, 0, size / 2 - s * centre[0]], [0, s, size / 2 - s * centre[1]]], np.float64)
    return cv2.warpAffine(frame, warp, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


class Deep3DExpression(TorchScriptDetector):
    """64 Deep3DFaceRecon expression coefficients of each face (E-FID)."""

    kind = "deep3d-exp-64"
    key = "eval.deep3d_path"
    kwargs: dict = {}
    batch_size = 32

    def __call__(self, frames, landmarks: np.ndarray) -> np.ndarray:
        """``frames`` (N, H, W, 3) uint8 with ``landmarks`` (N, 68, 2) (all finite) -> (N, 64)."""
        frames = as_frames(frames)
        crops = np.stack([deep3d_crop(f, lm) for f, lm in zip(frames, np.asarray(landmarks, np.float64))])
        feats = []
        for b in self._batches(crops, "deep3d"):
            x = torch.from_numpy(rearrange(b, "n h w c -> n c h w").astype(np.float32) / 255.0)
            coeffs = self.run(x)
            if coeffs.shape[1] < DEEP3D_EXPRESSION.stop:
                raise McdmError(f"{self.key}: {self.path.name} returned {coeffs.shape[1]} coefficients; expected 257")
            feats.append(coeffs[:, DEEP3D_EXPRESSION])
        return np.concatenate(feats)
