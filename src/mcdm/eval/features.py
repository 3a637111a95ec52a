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

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from mcdm.face.dlib import BROWS, EYE_L, EYE_R, MOUTH, NOSE, DlibFace
from mcdm.errors import McdmError

# ---------------------------------------------------------------------------------------------
# input normalisation


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


# ---------------------------------------------------------------------------------------------
# TorchScript detectors given by local path


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


# ---------------------------------------------------------------------------------------------
# dlib per-frame analysis, cached by frame content


DESCRIPTOR_DIM = 128  # dlib's ResNet face descriptor


@dataclass
class FrameFace:
    found: bool
    scale: int  # the frame was upscaled by this integer factor for dlib
    box: tuple[int, int, int, int] | None  # face box in the upscaled frame
    landmarks: np.ndarray | None  # (68, 2) float64, frame pixels
    descriptor: np.ndarray | None = None  # (128,) float64, computed on first request


class DlibFrameFeatures:
    """dlib face detection -> 68 landmarks -> 128-d descriptor for frames, cached by content.

    One instance is shared by all metrics of a run, so a frame is analysed once whatever metrics
    need it (FID, FVD fallback, E-FID, identity, Sync). Frames smaller than ``min_side`` are
    upscaled by an integer factor first: HOG finds faces of ~80 px and up, and our talking-head
    crops are 64 px at the embedded scale. A frame without a face gives NaN rows; callers count them.
    """

    def __init__(self, face: DlibFace | None = None, min_side: int = 160):
        self.face = face or DlibFace()
        self.min_side = min_side
        self._cache: dict[bytes, FrameFace] = {}

    @staticmethod
    def _key(frame: np.ndarray) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray(frame.shape, np.int64).tobytes())
        h.update(np.ascontiguousarray(frame).tobytes())
        return h.digest()

    def _upscaled(self, frame: np.ndarray, scale: int) -> np.ndarray:
        if scale == 1:
            return np.ascontiguousarray(frame)
        h, w = frame.shape[:2]
        return cv2.resize(frame, (w * scale, h * scale), interpolation=cv2.INTER_LINEAR)

    def analyse(self, frame: np.ndarray) -> FrameFace:
        key = self._key(frame)
        if key not in self._cache:
            scale = max(1, math.ceil(self.min_side / min(frame.shape[:2])))
            big = self._upscaled(frame, scale)
            faces = self.face.detect(big) or self.face.detect(big, upsample=1)
            if faces:
                box = faces[0].box
                lm = self.face.landmarks(big, box).astype(np.float64)
                # a landmark p in the upscaled frame is at (p + 0.5) / scale - 0.5 in the frame
                self._cache[key] = FrameFace(True, scale, box, (lm + 0.5) / scale - 0.5)
            else:
                self._cache[key] = FrameFace(False, scale, None, None)
        return self._cache[key]

    def _each(self, frames: np.ndarray, desc: str):
        return tqdm(frames, desc=desc, leave=False, disable=None if len(frames) > 50 else True)

    def landmarks(self, frames, desc: str = "dlib landmarks") -> np.ndarray:
        """(N, 68, 2) float64 frame-pixel landmarks; NaN where no face was found."""
        frames = as_frames(frames)
        out = np.full((len(frames), 68, 2), np.nan)
        for i, frame in enumerate(self._each(frames, desc)):
            face = self.analyse(frame)
            if face.found:
                out[i] = face.landmarks
        return out

    def descriptors(self, frames, desc: str = "dlib descriptors") -> np.ndarray:
        """(N, 128) float64 face descriptors; NaN rows where no face was found."""
        frames = as_frames(frames)
        out = np.full((len(frames), DESCRIPTOR_DIM), np.nan)
        for i, frame in enumerate(self._each(frames, desc)):
            face = self.analyse(frame)
            if not face.found:
                continue
            if face.descriptor is None:
                big = self._upscaled(frame, face.scale)
                face.descriptor = np.asarray(self.face.descriptor(big, face.box), np.float64)
            out[i] = face.descriptor
        return out


    def prefetch(self, frames, want_descriptor=None, workers: int = 2, address: str | None = None,
                 min_frames: int = 1) -> int:
        """Analyse ``frames`` (and describe those where ``want_descriptor`` is true; default all) in
        ``workers`` Dask processes (:func:`mcdm.data.parallel.map_videos`) and keep the results in
        this cache, so the metrics that follow find them. dlib runs on one core per process, so on
        2 cores this halves the metrics' dlib time. Frames already done are skipped; with fewer than
        ``min_frames`` left (a cluster's start-up costs a few seconds) or one worker and no
        scheduler it does nothing and the metrics analyse lazily in-process. A chunk whose worker
        fails is left to that lazy path. Returns the number of frames analysed."""
        from functools import partial

        from mcdm.data.parallel import Crashed, map_videos

        frames = as_frames(frames)
        want = np.ones(len(frames), bool) if want_descriptor is None else np.asarray(want_descriptor, bool)
        todo: dict[bytes, tuple[np.ndarray, bool]] = {}
        for frame, describe in zip(frames, want):
            key = self._key(frame)
            done = self._cache.get(key)
            if done is not None and (not describe or not done.found or done.descriptor is not None):
                continue
            todo[key] = (frame, describe or todo.get(key, (None, False))[1])
        if len(todo) < max(min_frames, 1) or (workers < 2 and not address):
            return 0
        keys = list(todo)
        size = max(1, math.ceil(len(keys) / (4 * max(workers, 1))))  # 4 chunks a worker: even finish
        chunks = [keys[i:i + size] for i in range(0, len(keys), size)]
        items = [(np.stack([todo[k][0] for k in chunk]), np.array([todo[k][1] for k in chunk])) for chunk in chunks]
        results = map_videos(partial(analyse_frames, min_side=self.min_side), items, workers=workers,
                             address=address, desc="dlib faces")
        for chunk, faces in zip(chunks, results):
            if isinstance(faces, Crashed):
                continue
            for key, face in zip(chunk, faces):
                self._cache[key] = face
        return len(keys)


_WORKER_FACES: dict[int, DlibFrameFeatures] = {}


def analyse_frames(item: tuple[np.ndarray, np.ndarray], min_side: int) -> list[FrameFace]:
    """Worker side of :meth:`DlibFrameFeatures.prefetch`: ``FrameFace`` of each frame of a chunk,
    with its descriptor where asked (the dlib models load once per worker process)."""
    frames, want = item
    faces = _WORKER_FACES.get(min_side)
    if faces is None:
        faces = _WORKER_FACES[min_side] = DlibFrameFeatures(min_side=min_side)
    out = []
    for frame, describe in zip(frames, want):
        face = faces.analyse(frame)
        if describe and face.found:
            faces.descriptors(frame[None])
        out.append(face)
    return out


class DlibDescriptorFeatures:
    """FID fallback: the 128-d dlib face descriptor of each frame (NaN rows: no face)."""

    label = "dlib-descriptor-128"

    def __init__(self, faces: DlibFrameFeatures | None = None):
        self.faces = faces or DlibFrameFeatures()

    def __call__(self, frames) -> np.ndarray:
        return self.faces.descriptors(frames)


# ---------------------------------------------------------------------------------------------
# landmark geometry: Procrustes alignment and expression offsets

RIGID = np.r_[NOSE.start:NOSE.stop, EYE_L.start:EYE_L.stop, EYE_R.start:EYE_R.stop]  # alignment anchors
EXPRESSION = np.r_[MOUTH.start:MOUTH.stop, BROWS.start:BROWS.stop, EYE_L.start:EYE_L.stop, EYE_R.start:EYE_R.stop]


def fill_missing(landmarks: np.ndarray) -> np.ndarray:
    """Linear interpolation over time of frames whose landmarks are NaN (edges: nearest frame)."""
    lm = np.array(landmarks, np.float64)
    ok = np.isfinite(lm).all(axis=(1, 2))
    if ok.all() or not ok.any():
        return lm
    t = np.arange(len(lm))
    flat = lm.reshape(len(lm), -1)
    for j in range(flat.shape[1]):
        flat[~ok, j] = np.interp(t[~ok], t[ok], flat[ok, j])
    return flat.reshape(lm.shape)


def _eye_centres(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return lm[..., EYE_L, :].mean(axis=-2), lm[..., EYE_R, :].mean(axis=-2)


def canonical_frame(shape: np.ndarray) -> np.ndarray:
    """The similarity that puts the eye centres at (-0.5, 0) and (0.5, 0), applied to ``shape`` (68, 2):
    unit inter-ocular distance, eye line horizontal."""
    z = shape[:, 0] + 1j * shape[:, 1]
    left, right = _eye_centres(shape)
    p1, p2 = complex(*left), complex(*right)
    a = 1.0 / (p2 - p1)  # maps p2 - p1 to 1
    w = a * (z - p1) - 0.5
    return np.stack([w.real, w.imag], axis=1)


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ s R src + t`` per shape (Umeyama 1991, no reflection).

    ``src`` (N, K, 2), ``dst`` (K, 2) -> scale (N,), rotation (N, 2, 2), translation (N, 2).
    """
    mu_x, mu_y = src.mean(axis=1), dst.mean(axis=0)
    xc, yc = src - mu_x[:, None], dst - mu_y
    cov = np.einsum("kd,nke->nde", yc, xc) / src.shape[1]  # (N, 2, 2) = Sigma_xy
    u, sv, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    fix = np.stack([np.ones_like(d), d], axis=1)  # diag(1, d) keeps R a rotation
    rot = u @ (fix[:, :, None] * vt)
    var_x = (xc**2).sum(axis=(1, 2)) / src.shape[1]
    scale = (sv * fix).sum(axis=1) / var_x
    trans = mu_y - scale[:, None] * np.einsum("nde,ne->nd", rot, mu_x)
    return scale, rot, trans


def procrustes_align(landmarks: np.ndarray, template: np.ndarray, anchors: np.ndarray = RIGID) -> np.ndarray:
    """Each (68, 2) shape mapped by the similarity that best fits its ``anchors`` to the template's."""
    lm = np.asarray(landmarks, np.float64)
    scale, rot, trans = similarity_fit(lm[:, anchors], np.asarray(template, np.float64)[anchors])
    return scale[:, None, None] * np.einsum("nde,nke->nkd", rot, lm) + trans[:, None]


def expression_template(landmarks: np.ndarray, iterations: int = 5) -> np.ndarray:
    """Generalised-Procrustes mean shape (68, 2) in the canonical frame of ``canonical_frame``.

    Starts from the first shape and alternates "align all to the mean" / "mean of the aligned".
    Applying any similarity to any input shape leaves the result unchanged.
    """
    lm = np.asarray(landmarks, np.float64)
    lm = lm[np.isfinite(lm).all(axis=(1, 2))]
    if len(lm) == 0:
        raise McdmError("landmark template: no frame has landmarks (no face found)")
    template = canonical_frame(lm[0])
    for _ in range(iterations):
        template = canonical_frame(procrustes_align(lm, template).mean(axis=0))
    return template


def landmark_expression_features(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """(N, 68, 2) landmarks -> (N, 84) pose-normalised expression offsets (mouth, brows, eyes) from
    the template, in inter-ocular-distance units."""
    aligned = procrustes_align(landmarks, template)
    return (aligned - template)[:, EXPRESSION].reshape(len(aligned), -1)


# ---------------------------------------------------------------------------------------------
# FVD fallback: appearance + motion features of 16-frame clips

SIGNALS = ("mouth_open", "mouth_width", "eye_open_l", "eye_open_r", "brow_raise",
           "head_x", "head_y", "head_scale", "head_roll")


def face_signals(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """(T, 68, 2) frame-pixel landmarks of one clip -> (T, 9) per-frame ``SIGNALS``, all in
    inter-ocular-distance (IOD) units or radians, so they do not depend on the frame size.

    Expression signals are measured on the Procrustes-aligned shape; head signals are the
    eye-centre position over the clip's median IOD, the log of IOD over its median (zoom) and the
    in-plane roll of the eye line.
    """
    a = procrustes_align(landmarks, template)
    y = a[..., 1]
    mouth_open = (y[:, [67, 66, 65]] - y[:, [61, 62, 63]]).mean(axis=1)
    mouth_width = a[:, 54, 0] - a[:, 48, 0]
    eye_open_l = (y[:, [41, 40]] - y[:, [37, 38]]).mean(axis=1)
    eye_open_r = (y[:, [47, 46]] - y[:, [43, 44]]).mean(axis=1)
    brow_raise = y[:, EYE_L.start:EYE_R.stop].mean(axis=1) - y[:, BROWS].mean(axis=1)
    left, right = _eye_centres(np.asarray(landmarks, np.float64))
    centre, span = (left + right) / 2, right - left
    iod = np.hypot(span[:, 0], span[:, 1])
    unit = float(np.median(iod))
    head = [centre[:, 0] / unit, centre[:, 1] / unit, np.log(iod / unit), np.arctan2(span[:, 1], span[:, 0])]
    return np.stack([mouth_open, mouth_width, eye_open_l, eye_open_r, brow_raise, *head], axis=1)


def clip_dynamics(frames: np.ndarray, signals: np.ndarray, descriptors: np.ndarray, fps: float) -> np.ndarray:
    """One clip's feature vector: [descriptor mean (128), descriptor std (128), amplitude spectra of
    the signals' velocities (T//2 bins x 9, units per second), signal means (9), amplitude spectrum
    of the frame-difference energy (T//2 bins, per second)]: 345 numbers for 16 frames."""
    d = descriptors[np.isfinite(descriptors).all(axis=1)]
    appearance = np.concatenate([d.mean(axis=0), d.std(axis=0)])
    steps = len(signals) - 1
    velocity = np.diff(signals, axis=0) * fps  # (T-1, 9) per second
    motion = np.abs(np.fft.rfft(velocity, axis=0)) / steps  # (T//2, 9)
    gray = frames.astype(np.float64).mean(axis=-1) / 255.0
    energy = np.abs(np.diff(gray, axis=0)).mean(axis=(1, 2)) * fps  # (T-1,) mean |f_{t+1} - f_t| per second
    energy_spectrum = np.abs(np.fft.rfft(energy)) / steps
    return np.concatenate([appearance, motion.ravel(), signals.mean(axis=0), energy_spectrum])


CLIP_DYNAMICS_PARTS = ("appearance", "motion", "mean_signals", "frame_change")


def clip_dynamics_parts(clip_frames: int) -> dict[str, slice]:
    """Where each of ``CLIP_DYNAMICS_PARTS`` lies in ``clip_dynamics``'s vector for ``clip_frames``-frame
    clips: appearance (descriptor mean and std), motion (velocity spectra), mean_signals, frame_change
    (spectrum of the frame-difference energy). The FVD fallback reports its Fréchet distance on each
    part beside the whole, so a value can be read as "looks wrong" or "moves wrong"."""
    bins = (clip_frames - 1) // 2 + 1  # rfft of the T - 1 frame-to-frame steps
    sizes = (2 * DESCRIPTOR_DIM, bins * len(SIGNALS), len(SIGNALS), bins)
    ends = np.cumsum(sizes)
    return {part: slice(int(end - size), int(end)) for part, size, end in zip(CLIP_DYNAMICS_PARTS, sizes, ends)}


class DynamicsVideoFeatures:
    """FVD fallback: ``clip_dynamics`` of every non-overlapping ``clip_frames`` clip.

    The face descriptor is taken on every ``descriptor_every``-th frame of a clip (the expensive
    part); landmarks on every frame, with frames lacking a face interpolated from their
    neighbours. A clip with fewer than ``min_face_fraction`` of its frames holding a face is
    dropped and counted.
    """

    label = "fvd-fallback:dlib-descriptor+landmark-dynamics"

    def __init__(self, faces: DlibFrameFeatures | None = None, descriptor_every: int = 4, min_face_fraction: float = 0.5,
                 fps: float = 25.0):
        self.faces = faces or DlibFrameFeatures()
        self.fps = fps
        self.descriptor_every = descriptor_every
        self.min_face_fraction = min_face_fraction

    def template(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """The expression template of a clip set (computed on the real set, shared with the fake)."""
        return expression_template(np.concatenate([self.faces.landmarks(c) for c in clips]))

    def __call__(self, clips: Sequence[np.ndarray], template: np.ndarray) -> tuple[np.ndarray, int]:
        """(clip features (M, D), number of clips dropped for lack of a face)."""
        feats, dropped = [], 0
        for clip in tqdm(clips, desc="fvd fallback", leave=False, disable=None if len(clips) > 4 else True):
            lm = self.faces.landmarks(clip)
            found = np.isfinite(lm).all(axis=(1, 2))
            desc = self.faces.descriptors(clip[:: self.descriptor_every])
            if found.mean() < self.min_face_fraction or not np.isfinite(desc).all(axis=1).any():
                dropped += 1
                continue
            signals = face_signals(fill_missing(lm), template)
            feats.append(clip_dynamics(clip, signals, desc, self.fps))
        return (np.stack(feats) if feats else np.empty((0, 0))), dropped
