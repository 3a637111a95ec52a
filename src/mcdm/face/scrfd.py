"""SCRFD (InsightFace) face detection from a local ONNX file, run with OpenCV's DNN module."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mcdm.errors import McdmError
from mcdm.face.dlib import Face


# ------------------------------------------------------------------------------------ detectors
class ScrfdDetector:
    """SCRFD (InsightFace) from a local ONNX file, run with OpenCV's DNN module; same ``detect``
    interface as :class:`DlibFace` (boxes in image pixels, best first)."""

    input_size = 640

    def __init__(self, path: str | None, score_threshold: float = 0.5, nms_threshold: float = 0.4):
        if not path or not Path(path).is_file():
            raise McdmError(f"data.face_detector is 'scrfd' but data.scrfd_path {path!r} is not a file")
        self.path, self.score_threshold, self.nms_threshold = str(path), score_threshold, nms_threshold
        self._net = None

    def __getstate__(self):
        return {"path": self.path, "score_threshold": self.score_threshold,
                "nms_threshold": self.nms_threshold, "_net": None}

    def detect(self, rgb: np.ndarray, **_) -> list[Face]:
        if self._net is None:
            self._net = cv2.dnn.readNetFromONNX(self.path)
        h, w = rgb.shape[:2]
        s = self.input_size / max(h, w)
        canvas = np.zeros((self.input_size, self.input_size, 3), np.uint8)
        canvas[: round(h * s), : round(w * s)] = cv2.resize(rgb, (round(w * s), round(h * s)))
        blob = cv2.dnn.blobFromImage(canvas, 1.0 / 128, (self.input_size, self.input_size), (127.5,) * 3)
        self._net.setInput(blob)
        outs = self._net.forward(self._net.getUnconnectedOutLayersNames())
        boxes, scores = decode_scrfd(outs, self.input_size, self.score_threshold)
        keep = cv2.dnn.NMSBoxes([[*b[:2], *(b[2:] - b[:2])] for b in boxes.tolist()], scores.tolist(),
                                self.score_threshold, self.nms_threshold) if len(boxes) else []
        faces = [Face(tuple(int(round(v / s)) for v in boxes[i]), float(scores[i])) for i in np.ravel(keep)]
        return sorted(faces, key=lambda f: -f.score)


def decode_scrfd(outputs, input_size: int, score_threshold: float, strides=(8, 16, 32),
                 anchors_per_cell: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """SCRFD heads -> boxes (N,4 x1,y1,x2,y2) and scores, before NMS.

    Each stride s has a (input/s)^2 grid with ``anchors_per_cell`` anchors at the cell corner
    (x*s, y*s); a box is that point minus/plus the predicted distances x stride (distance2bbox).
    Heads are matched by shape (scores: last dim 1, boxes: 4; key points, 10, are not needed).
    """
    arrs = [np.asarray(o).reshape(-1, np.asarray(o).shape[-1]) for o in outputs]
    by_len: dict[int, dict[int, np.ndarray]] = {}
    for a in arrs:
        by_len.setdefault(len(a), {})[a.shape[1]] = a
    all_boxes, all_scores = [], []
    for s in strides:
        g = input_size // s
        n = g * g * anchors_per_cell
        heads = by_len.get(n, {})
        if 1 not in heads or 4 not in heads:
            raise McdmError(f"SCRFD model outputs do not match stride {s} ({n} anchors)")
        ys, xs = np.mgrid[:g, :g]
        centers = np.repeat(np.stack([xs.ravel(), ys.ravel()], 1) * s, anchors_per_cell, axis=0).astype(np.float32)
        score = heads[1][:, 0]
        d = heads[4] * s
        keep = score >= score_threshold
        c, d = centers[keep], d[keep]
        all_boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
        all_scores.append(score[keep])
    return np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_scores).astype(np.float32)
