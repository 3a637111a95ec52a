"""Per-frame face animation of a portrait: mouth, blinks, expressions and head motion.

A :class:`FaceRig` is built once per identity from its portrait and 68 landmarks:

- *action units* are sparse landmark displacements (jaw opening, smile, brow raise, head yaw and
  pitch as a depth-weighted shift) interpolated to dense displacement fields by a thin-plate
  spline, windowed to zero away from the face;
- a frame is ``warp(portrait, sum_k a_k(t) * field_k)`` (one ``cv2.remap`` of the face region),
  then the mouth interior (dark cavity, a band of upper teeth) is drawn inside the displaced inner
  lips, the eyelids close over the eyes by the blink amount, and a global similarity transform
  (roll, translation, a fixed zoom) places the head in the frame.

Everything per frame is a few cv2 calls on a 256 x 256 image, about 3 ms.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.interpolate import RBFInterpolator

from mcdm.data.sample.portraits import Portrait

UNITS = ("jaw", "smile", "brow", "yaw", "pitch")
EXPRESSIONS = {0: "neutral", 1: "smile", 2: "brow_raise"}
ZOOM = 1.12  # fixed camera zoom: the frame never shows the portrait's edge under head motion

# per-landmark depth (fraction of the inter-ocular distance) for the yaw / pitch parallax
_DEPTH = np.zeros(68, np.float32)
_DEPTH[0:17] = 0.55 * np.sin(np.linspace(0, np.pi, 17)) - 0.15  # jaw: ears behind, chin in front
_DEPTH[17:27] = 0.45
_DEPTH[27:31] = np.linspace(0.6, 1.0, 4)  # nose bridge -> tip
_DEPTH[31:36] = 0.75
_DEPTH[36:48] = 0.35
_DEPTH[48:68] = 0.6


@dataclass
class FrameState:
    mouth: float = 0.0  # 0 closed .. 1 wide open
    blink: float = 0.0  # 0 open .. 1 closed
    smile: float = 0.0
    brow: float = 0.0
    yaw: float = 0.0  # degrees, + turns to the viewer's right
    pitch: float = 0.0  # degrees, + looks down
    roll: float = 0.0  # degrees, + counter-clockwise
    tx: float = 0.0  # pixels
    ty: float = 0.0


def _sparse_units(lm: np.ndarray) -> dict[str, np.ndarray]:
    """(68, 2) landmark displacement in pixels for each action unit at amount 1."""
    iod = float(np.linalg.norm(lm[42:48].mean(0) - lm[36:42].mean(0)))
    units = {k: np.zeros((68, 2), np.float32) for k in UNITS}
    # jaw: lower lip and chin drop, jaw line follows less towards the ears; upper lip lifts a little
    d = 0.34 * iod
    jaw = units["jaw"]
    jaw[[65, 66, 67], 1] = d
    jaw[[56, 57, 58], 1] = d
    jaw[[55, 59], 1] = 0.8 * d
    jaw[[54, 48, 60, 64], 1] = 0.25 * d
    jaw[[61, 62, 63, 50, 51, 52], 1] = -0.06 * d
    for i, w in zip(range(3, 14), (0.05, 0.2, 0.4, 0.6, 0.85, 0.9, 0.85, 0.6, 0.4, 0.2, 0.05)):
        jaw[i, 1] = w * d
    # smile: mouth corners up and out, lips stretch, lower eyelids push up
    s = units["smile"]
    s[48] = (-0.12 * iod, -0.12 * iod)
    s[54] = (0.12 * iod, -0.12 * iod)
    s[[49, 59, 60]] = (-0.06 * iod, -0.05 * iod)
    s[[53, 55, 64]] = (0.06 * iod, -0.05 * iod)
    s[[40, 41, 46, 47], 1] = -0.04 * iod
    s[[2, 3], 0], s[[13, 14], 0] = -0.03 * iod, 0.03 * iod
    # brow raise: brows up, upper lids follow a little
    b = units["brow"]
    b[17:27, 1] = -0.11 * iod
    b[[19, 24], 1] = -0.13 * iod
    b[[37, 38, 43, 44], 1] = -0.025 * iod
    # yaw / pitch per radian: parallax shift proportional to depth
    units["yaw"][:, 0] = _DEPTH * 0.9 * iod
    units["pitch"][:, 1] = _DEPTH * 0.9 * iod
    return units


def _ring(lm: np.ndarray, scale: float, n: int = 20) -> np.ndarray:
    c = lm[27:36].mean(0)
    span = np.abs(lm - c).max(0) * scale
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([c[0] + span[0] * np.cos(a), c[1] + span[1] * np.sin(a)], 1).astype(np.float32)


class FaceRig:
    """A portrait that can be animated frame by frame (see :meth:`render`)."""

    def __init__(self, portrait: Portrait) -> None:
        self.portrait = portrait
        self.image = portrait.image
        self.lm = portrait.landmarks.astype(np.float32)
        self.size = portrait.size
        self.iod = float(np.linalg.norm(self.lm[42:48].mean(0) - self.lm[36:42].mean(0)))
        self.units = _sparse_units(self.lm)
        self._build_fields()
        self._build_eyes()
        self.centre = self.lm[27:36].mean(0)

    # -- precomputation ------------------------------------------------------------------------
    def _build_fields(self) -> None:
        """Dense (K, 2, h, w) forward displacement fields over the face region ``self.roi``."""
        lm, s = self.lm, self.size
        ring = _ring(lm, 1.45)
        x0, y0 = np.floor(np.maximum(ring.min(0), 0)).astype(int)
        x1, y1 = np.ceil(np.minimum(ring.max(0), s - 1)).astype(int) + 1
        self.roi = (x0, y0, x1, y1)
        h, w = y1 - y0, x1 - x0
        # thin-plate spline through the landmarks, pinned to zero on a ring around the face;
        # evaluated on a coarse grid and resized (the fields are smooth)
        pts = np.concatenate([lm, ring, _ring(lm, 1.9, 24)])
        gh, gw = max(h // 4, 8), max(w // 4, 8)
        gy, gx = np.meshgrid(np.linspace(y0, y1 - 1, gh), np.linspace(x0, x1 - 1, gw), indexing="ij")
        grid = np.stack([gx.ravel(), gy.ravel()], 1)
        # window: 1 inside the inner ring, 0 at the ROI border (the spline is not zero outside)
        c = lm[27:36].mean(0)
        span = np.abs(lm - c).max(0) * 1.45
        r = np.sqrt(((grid[:, 0] - c[0]) / span[0]) ** 2 + ((grid[:, 1] - c[1]) / span[1]) ** 2)
        window = np.clip(1.0 - np.clip(r - 0.8, 0, None) / 0.2, 0, 1)
        fields = np.zeros((len(UNITS), 2, h, w), np.float32)
        for k, name in enumerate(UNITS):
            vals = np.concatenate([self.units[name], np.zeros((len(pts) - 68, 2), np.float32)])
            rbf = RBFInterpolator(pts, vals, kernel="thin_plate_spline", smoothing=1e-3)
            dense = (rbf(grid) * window[:, None]).reshape(gh, gw, 2).astype(np.float32)
            for ax in range(2):
                fields[k, ax] = cv2.resize(dense[..., ax], (w, h), interpolation=cv2.INTER_LINEAR)
        self.fields = fields
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        self._grid = (xx, yy)

    def _build_eyes(self) -> None:
        """Closed-eye patches (eye inpainted with lid skin + a lash line) and their coverage maps."""
        self.eyes = []
        for idx_up, idx_low in (((36, 37, 38, 39), (36, 41, 40, 39)), ((42, 43, 44, 45), (42, 47, 46, 45))):
            up, low = self.lm[list(idx_up)], self.lm[list(idx_low)]
            pad = 0.22 * self.iod
            x0, y0 = np.floor(np.minimum(up.min(0), low.min(0)) - pad).astype(int)
            x1, y1 = np.ceil(np.maximum(up.max(0), low.max(0)) + pad).astype(int) + 1
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.size), min(y1, self.size)
            patch = self.image[y0:y1, x0:x1].copy()
            poly = np.concatenate([up, low[::-1][1:-1]]) - np.float32([x0, y0])
            mask = np.zeros(patch.shape[:2], np.uint8)
            cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 255)
            mask = cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=2)
            closed = cv2.inpaint(patch, mask, 3, cv2.INPAINT_TELEA)
            # lid crease shading and the lash line where the lids meet (just above the lower lid)
            lash = (low - np.float32([x0, y0])) + np.float32([0, -0.04 * self.iod])
            cv2.polylines(closed, [np.round(lash).astype(np.int32)], False, (45, 30, 25), 2, cv2.LINE_AA)
            # coverage: 0 at the upper lid .. 1 at the lower lid, per column
            xs = np.arange(x0, x1, dtype=np.float32)
            y_up = np.interp(xs, up[:, 0], up[:, 1])
            y_low = np.interp(xs, low[:, 0], low[:, 1])
            yy = np.arange(y0, y1, dtype=np.float32)[:, None]
            cover = (yy - (y_up[None] - 0.12 * self.iod)) / np.maximum(y_low[None] - y_up[None] + 0.12 * self.iod, 1)
            soft = cv2.GaussianBlur(mask.astype(np.float32) / 255, (5, 5), 0)
            self.eyes.append(((x0, y0, x1, y1), closed.astype(np.float32), cover.astype(np.float32), soft))

    # -- per frame -------------------------------------------------------------------------------
    def amounts(self, st: FrameState) -> np.ndarray:
        return np.float32([st.mouth, st.smile, st.brow, np.deg2rad(st.yaw), np.deg2rad(st.pitch)])

    def landmarks(self, st: FrameState) -> np.ndarray:
        """The 68 landmarks of the rendered frame (output pixel coordinates)."""
        a = self.amounts(st)
        lm = self.lm + sum(a[k] * self.units[name] for k, name in enumerate(UNITS))
        m = self.camera(st)
        return lm @ m[:, :2].T + m[:, 2]

    def camera(self, st: FrameState) -> np.ndarray:
        """2x3 similarity: roll about the face centre, zoom, translation, into the output frame."""
        m = cv2.getRotationMatrix2D((float(self.centre[0]), float(self.centre[1])), st.roll, ZOOM)
        m[:, 2] += np.float32([st.tx, st.ty])
        return m.astype(np.float32)

    def render(self, st: FrameState) -> np.ndarray:
        img = self.image.copy()
        # 1. eyelids: blend towards the closed-eye patch from the upper lid down
        if st.blink > 0.02:
            for (x0, y0, x1, y1), closed, cover, soft in self.eyes:
                alpha = np.clip((st.blink * 1.05 - cover) / 0.12, 0, 1) * soft
                roi = img[y0:y1, x0:x1].astype(np.float32)
                img[y0:y1, x0:x1] = (roi + (closed - roi) * alpha[..., None]).astype(np.uint8)
        # 2. action units: backward-warp the face region by the summed displacement field
        a = self.amounts(st)
        x0, y0, x1, y1 = self.roi
        if np.any(np.abs(a) > 1e-4):
            # backward map p -> p - u(q) with q = p - u(p): one fixed-point step of the inverse warp
            disp = np.tensordot(a, self.fields, axes=1)  # (2, h, w) forward displacement u
            qx = (self._grid[0] - disp[0] - np.float32(x0)).astype(np.float32)
            qy = (self._grid[1] - disp[1] - np.float32(y0)).astype(np.float32)
            ux = cv2.remap(disp[0], qx, qy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            uy = cv2.remap(disp[1], qx, qy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            mx, my = self._grid[0] - ux, self._grid[1] - uy
            img[y0:y1, x0:x1] = cv2.remap(self.image if st.blink <= 0.02 else img, mx, my, cv2.INTER_LINEAR,
                                          borderMode=cv2.BORDER_REFLECT101)
        # 3. mouth interior inside the displaced inner lips
        if st.mouth > 0.03:
            self._draw_mouth(img, a, st.mouth)
        # 4. camera: roll, zoom, translation
        return cv2.warpAffine(img, self.camera(st), (self.size, self.size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT101)

    def _draw_mouth(self, img: np.ndarray, a: np.ndarray, opening: float) -> None:
        lm = self.lm + sum(a[k] * self.units[name] for k, name in enumerate(UNITS))
        inner = lm[60:68]
        upper = lm[[60, 61, 62, 63, 64]]
        gap = float(inner[[5, 6, 7], 1].mean() - inner[[1, 2, 3], 1].mean())  # lower - upper inner lip
        if gap < 1.0:
            return
        x0, y0 = np.floor(inner.min(0) - 3).astype(int)
        x1, y1 = np.ceil(inner.max(0) + 3).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, img.shape[1]), min(y1, img.shape[0])
        off = np.float32([x0, y0])
        layer = img[y0:y1, x0:x1].copy()
        cv2.fillPoly(layer, [np.round((inner - off) * 4).astype(np.int32)], (62, 22, 26), cv2.LINE_AA, shift=2)
        teeth_h = min(0.3 * gap, 0.09 * self.iod) * np.float32([0.2, 0.9, 1.0, 0.9, 0.2])[:, None]
        band = np.concatenate([upper, (upper + np.concatenate([np.zeros_like(teeth_h), teeth_h], 1))[::-1]])
        cv2.fillPoly(layer, [np.round((band - off) * 4).astype(np.int32)], (226, 222, 210), cv2.LINE_AA, shift=2)
        layer = cv2.GaussianBlur(layer, (3, 3), 0)
        alpha = np.float32(min(1.0, opening / 0.15))
        roi = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = (roi * (1 - alpha) + layer * alpha).astype(np.uint8)
