"""The dlib face analysis behind the fallback metrics: 68 landmarks and the 128-d descriptor of each
frame's face, cached by frame content, optionally computed in Dask worker processes first."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import cv2
import numpy as np
from tqdm import tqdm

from mcdm.data.parallel import Crashed, map_videos
from mcdm.eval.detectors import as_frames
from mcdm.face.dlib import DlibFace

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
