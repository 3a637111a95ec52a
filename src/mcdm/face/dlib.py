"""dlib's pretrained face models, shipped by the ``dlib-bin`` and ``face_recognition_models`` wheels.

- HOG frontal face detector (``dlib.get_frontal_face_detector``)
- 68-point landmark predictor (iBUG 300-W layout)
- ResNet 128-d face descriptor (the identity embedding: same person < ~0.6 apart)

The models are loaded lazily, once per process, so the object can be pickled to Dask workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# 68-landmark index groups (iBUG 300-W)
JAW = slice(0, 17)
BROWS = slice(17, 27)
NOSE = slice(27, 36)
EYE_L = slice(36, 42)
EYE_R = slice(42, 48)
MOUTH = slice(48, 68)
INNER_MOUTH = slice(60, 68)


def models_dir() -> Path:
    """Folder of face_recognition_models' .dat files, found without importing pkg_resources."""
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face_recognition_models is not installed (pip install face_recognition_models)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # left, top, right, bottom (pixels)
    score: float

    @property
    def size(self) -> int:
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])


class DlibFace:
    """Detector + 68 landmarks + 128-d descriptor, loaded on first use in each process."""

    _cache: dict[int, tuple] = {}

    def _models(self):
        pid = os.getpid()
        if pid not in self._cache:
            import dlib

            d = models_dir()
            self._cache[pid] = (
                dlib.get_frontal_face_detector(),
                dlib.shape_predictor(str(d / "shape_predictor_68_face_landmarks.dat")),
                dlib.face_recognition_model_v1(str(d / "dlib_face_recognition_resnet_model_v1.dat")),
            )
        return self._cache[pid]

    def __getstate__(self):
        return {}

    def detect(self, rgb: np.ndarray, upsample: int = 0, min_score: float = 0.0) -> list[Face]:
        """Faces in an RGB uint8 image, best first."""
        detector = self._models()[0]
        rects, scores, _ = detector.run(np.ascontiguousarray(rgb), upsample, min_score)
        faces = [Face((r.left(), r.top(), r.right(), r.bottom()), float(s)) for r, s in zip(rects, scores)]
        return sorted(faces, key=lambda f: -f.score)

    def landmarks(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """(68, 2) float32 landmark coordinates (x, y) inside ``box``."""
        import dlib

        predictor = self._models()[1]
        shape = predictor(np.ascontiguousarray(rgb), dlib.rectangle(*[int(v) for v in box]))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)

    def descriptor(self, rgb: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray | None:
        """128-d identity descriptor of the face in ``box`` (detected when None); None if no face."""
        import dlib

        rgb = np.ascontiguousarray(rgb)
        if box is None:
            faces = self.detect(rgb)
            if not faces:
                faces = self.detect(rgb, upsample=1)
            if not faces:
                return None
            box = faces[0].box
        predictor, encoder = self._models()[1], self._models()[2]
        shape = predictor(rgb, dlib.rectangle(*[int(v) for v in box]))
        return np.asarray(encoder.compute_face_descriptor(rgb, shape), dtype=np.float32)


def descriptor_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
