"""Identities of talkingface-wild-mini: two real portrait photos and faces derived from them.

The real photos are the only ones that ship inside installed packages: scikit-image's ``astronaut``
(Eileen Collins) and matplotlib's ``grace_hopper.jpg``. Every other identity is derived from them
by landmark-driven operations, so it is still a photographic face that dlib detects and describes:

- ``reshape``: move groups of the 68 landmarks (face width, eye spacing, nose / jaw length, mouth
  width, brow height) and warp the image piecewise-affinely onto the new shape;
- ``morph``: warp two faces onto their interpolated shape and cross-dissolve them inside the face;
- ``mirror`` and ``recolor`` (a colour grade) on top.

Each identity is a :class:`Portrait`: a square RGB image in a canonical layout (eyes level, at
fixed height, a fixed distance apart; dlib's face box is about half the side) and its 68
landmarks, detected by dlib on the final image.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from scipy.spatial import Delaunay

from mcdm.face.dlib import EYE_L, EYE_R, DlibFace

# canonical layout, as fractions of the portrait side
EYE_Y = 0.39
EYE_DIST = 0.22


@dataclass
class Portrait:
    name: str
    image: np.ndarray  # (S, S, 3) uint8 RGB
    landmarks: np.ndarray  # (68, 2) float32, (x, y) pixels
    recipe: str  # how it was made (for the manifest / report)

    @property
    def size(self) -> int:
        return self.image.shape[0]


def source_photos() -> dict[str, np.ndarray]:
    """The real portrait photos shipped inside installed packages (RGB uint8)."""
    import matplotlib.cbook
    from PIL import Image
    from skimage import data

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        hopper = np.asarray(Image.open(fh).convert("RGB"))
    return {"astronaut": data.astronaut(), "hopper": hopper}


def _eye_centres(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return lm[EYE_L].mean(0), lm[EYE_R].mean(0)


def canonical_crop(image: np.ndarray, lm: np.ndarray, size: int, canvas: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Similarity-align a face so its eyes sit at the canonical place of a ``size`` portrait.

    With ``canvas`` > size the output is that larger square with the portrait in its centre (room
    for derivations before the final crop). Returns (image, transformed landmarks).
    """
    out_side = canvas or size
    pad = (out_side - size) / 2
    left, right = _eye_centres(lm)
    src = np.float32([left, right])
    dst = np.float32([[size * (0.5 - EYE_DIST / 2), size * EYE_Y], [size * (0.5 + EYE_DIST / 2), size * EYE_Y]]) + pad
    m, _ = cv2.estimateAffinePartial2D(src, dst)  # two points determine the similarity exactly
    out = cv2.warpAffine(image, m, (out_side, out_side), flags=cv2.INTER_AREA if m[0, 0] < 1 else cv2.INTER_CUBIC,
                         borderMode=cv2.BORDER_REFLECT101)
    return out, transform_points(m, lm)


def transform_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def _anchors(size: int, n: int = 4) -> np.ndarray:
    """Fixed points on the image border (so a piecewise-affine warp leaves the border in place)."""
    t = np.linspace(0, size - 1, n + 1)
    pts = [(x, 0) for x in t] + [(x, size - 1) for x in t] + [(0, y) for y in t[1:-1]] + [(size - 1, y) for y in t[1:-1]]
    return np.float32(pts)


def piecewise_affine(image: np.ndarray, src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Warp ``image`` so that ``src_pts`` move to ``dst_pts`` (triangles of the destination points).

    Border anchors are added, so pixels far from the points stay where they are.
    """
    size = image.shape[0]
    anchors = _anchors(size)
    src = np.concatenate([src_pts, anchors]).astype(np.float32)
    dst = np.concatenate([dst_pts, anchors]).astype(np.float32)
    tri = Delaunay(dst).simplices
    out = image.copy()
    for t in tri:
        s, d = src[t], dst[t]
        x0, y0 = np.floor(d.min(0)).astype(int)
        x1, y1 = np.ceil(d.max(0)).astype(int) + 1
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, size), min(y1, size)
        if x1 <= x0 or y1 <= y0:
            continue
        m = cv2.getAffineTransform(d - np.float32([x0, y0]), s)  # destination -> source (backward map)
        patch = cv2.warpAffine(image, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REFLECT101)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillConvexPoly(mask, np.round(d - np.float32([x0, y0])).astype(np.int32), 1)
        region = out[y0:y1, x0:x1]
        region[mask > 0] = patch[mask > 0]
    return out


# ---------------------------------------------------------------------------------------------
# derivations


@dataclass(frozen=True)
class Shape:
    """Landmark-driven geometry change; 1.0 / 0.0 leave a feature as it is."""

    face_width: float = 1.0  # jaw x scale about the nose
    eye_spacing: float = 0.0  # extra distance between the eyes, in inter-ocular distances
    eye_size: float = 1.0
    nose_length: float = 0.0  # nose tip / nostrils moved down, in inter-ocular distances
    nose_width: float = 1.0
    mouth_width: float = 1.0
    mouth_drop: float = 0.0  # mouth moved down, in inter-ocular distances
    jaw_length: float = 1.0  # chin distance below the eyes, scaled
    brow_raise: float = 0.0  # brows moved up, in inter-ocular distances


def reshape_landmarks(lm: np.ndarray, shape: Shape) -> np.ndarray:
    lm = lm.astype(np.float32).copy()
    left, right = _eye_centres(lm)
    iod = float(np.linalg.norm(right - left))
    cx = float(lm[27:36, 0].mean())
    eye_y = float((left[1] + right[1]) / 2)
    out = lm.copy()
    # jaw: width about the nose line, length below the eye line (chin moves most)
    jaw = lm[0:17]
    out[0:17, 0] = cx + (jaw[:, 0] - cx) * shape.face_width
    out[0:17, 1] = eye_y + (jaw[:, 1] - eye_y) * (1 + (shape.jaw_length - 1) * np.clip((jaw[:, 1] - eye_y) / (lm[8, 1] - eye_y), 0, 1))
    # eyes and brows: spacing, size, brow height
    for eye, brow, sign in ((slice(36, 42), slice(17, 22), -1), (slice(42, 48), slice(22, 27), 1)):
        c = lm[eye].mean(0)
        out[eye] = c + (lm[eye] - c) * shape.eye_size
        out[eye, 0] += sign * shape.eye_spacing * iod / 2
        out[brow, 0] += sign * shape.eye_spacing * iod / 2
        out[brow, 1] -= shape.brow_raise * iod
    # nose: length (tip and nostrils down, bridge interpolated), nostril width
    bridge = np.linspace(0, 1, 4)[:, None]
    out[27:31, 1] += (bridge[:, 0] * shape.nose_length * iod)
    nose_c = lm[31:36, 0].mean()
    out[31:36, 0] = nose_c + (lm[31:36, 0] - nose_c) * shape.nose_width
    out[31:36, 1] += shape.nose_length * iod
    # mouth: width about its centre, drop
    mc = lm[48:68].mean(0)
    out[48:68, 0] = mc[0] + (lm[48:68, 0] - mc[0]) * shape.mouth_width
    out[48:68, 1] += shape.mouth_drop * iod + (shape.jaw_length - 1) * (mc[1] - eye_y) * 0.5
    return out


def reshape(image: np.ndarray, lm: np.ndarray, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    dst = reshape_landmarks(lm, shape)
    return piecewise_affine(image, lm, dst), dst


def face_mask(lm: np.ndarray, size: int, feather: float = 0.08, forehead: float = 0.6) -> np.ndarray:
    """Soft (S, S) float mask of the face: jaw line closed over the forehead above the brows."""
    left, right = _eye_centres(lm)
    iod = float(np.linalg.norm(right - left))
    top = lm[17:27].copy()
    top[:, 1] -= forehead * iod
    poly = np.concatenate([lm[0:17], top[::-1]]).astype(np.float32)
    hull = cv2.convexHull(poly).astype(np.int32)
    mask = np.zeros((size, size), np.float32)
    cv2.fillConvexPoly(mask, hull, 1.0)
    k = max(3, int(feather * size) | 1)
    return cv2.GaussianBlur(mask, (k, k), 0)


def morph(a: np.ndarray, lm_a: np.ndarray, b: np.ndarray, lm_b: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Face of ``a`` morphed ``t`` of the way to ``b`` (shape and appearance); a's hair and background."""
    lm = (1 - t) * lm_a + t * lm_b
    wa = piecewise_affine(a, lm_a, lm).astype(np.float32)
    wb = piecewise_affine(b, lm_b, lm).astype(np.float32)
    m = face_mask(lm, a.shape[0])[..., None] * t
    out = wa * (1 - m) + wb * m
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), lm.astype(np.float32)


def recolor(image: np.ndarray, gain: tuple[float, float, float]) -> np.ndarray:
    """Colour grade: per-channel gain (skin tone, hair and background shift together)."""
    return np.clip(image.astype(np.float32) * np.float32(gain) + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# the identities

# name -> (base photo(s), recipe). Chosen by measuring dlib-descriptor distances between the
# identities against the spread of rendered frames of each one (see tests/test_sample_data.py).
RECIPES: dict[str, dict] = {
    "astronaut": dict(base="astronaut"),
    "hopper": dict(base="hopper"),
    "mix_ah_long": dict(base="astronaut", flip=True, morph=("hopper", 0.42), gain=(1.0, 0.97, 0.95),
                        shape=Shape(face_width=0.92, eye_size=0.92, nose_length=0.12, mouth_width=1.17,
                                    mouth_drop=0.04, jaw_length=1.06, brow_raise=0.03)),
    "mix_ha_narrow": dict(base="hopper", morph=("astronaut", 0.54), gain=(0.95, 1.0, 1.05),
                          shape=Shape(face_width=0.94, eye_spacing=-0.07, eye_size=0.84, nose_length=-0.05,
                                      nose_width=0.9, jaw_length=1.13, brow_raise=0.09)),
    "astronaut_close_eyes": dict(base="astronaut", flip=True, gain=(1.05, 1.0, 0.93),
                                 shape=Shape(face_width=0.98, eye_spacing=-0.095, eye_size=0.855, nose_length=-0.04,
                                             mouth_drop=0.083, jaw_length=0.96, brow_raise=-0.047)),
    "astronaut_wide_eyes": dict(base="astronaut", gain=(0.94, 0.98, 1.06),
                                shape=Shape(face_width=0.98, eye_spacing=0.127, eye_size=1.1, nose_length=0.05,
                                            nose_width=0.836, mouth_width=0.839, jaw_length=0.916, brow_raise=0.098)),
    "mix_ha_broad": dict(base="hopper", flip=True, morph=("astronaut", 0.56), gain=(1.04, 0.98, 0.96),
                         shape=Shape(face_width=1.106, eye_spacing=0.064, eye_size=1.158, nose_length=-0.05,
                                     nose_width=1.24, mouth_width=0.889, mouth_drop=-0.038, jaw_length=1.10,
                                     brow_raise=0.079)),
    "hopper_long_nose": dict(base="hopper", flip=True, gain=(0.97, 1.0, 1.03),
                             shape=Shape(face_width=1.149, eye_spacing=-0.064, nose_length=0.133, mouth_drop=-0.046,
                                         jaw_length=1.055, brow_raise=0.088)),
    "mix_ah_big_eyes": dict(base="astronaut", flip=True, morph=("hopper", 0.31), gain=(1.02, 1.02, 0.94),
                            shape=Shape(eye_spacing=-0.08, eye_size=1.22, nose_length=0.062, nose_width=0.864,
                                        mouth_width=0.861, jaw_length=0.904, brow_raise=0.045)),
    "astronaut_big_eyes": dict(base="astronaut", flip=True, gain=(0.96, 0.96, 1.05),
                               shape=Shape(face_width=1.06, eye_spacing=0.103, eye_size=1.22, nose_length=-0.094,
                                           nose_width=0.865, mouth_width=0.95, mouth_drop=-0.036, jaw_length=1.036)),
}


def _detect_landmarks(face: DlibFace, image: np.ndarray, what: str) -> np.ndarray:
    faces = face.detect(image)
    if len(faces) != 1:
        raise RuntimeError(f"identity {what}: dlib finds {len(faces)} faces in the derived portrait")
    return face.landmarks(image, faces[0].box)


def build_identities(size: int = 256, names: list[str] | None = None) -> dict[str, Portrait]:
    """The identities of talkingface-wild-mini (deterministic: no randomness involved; cached)."""
    return dict(_build_identities(size, tuple(names or RECIPES)))


@lru_cache(maxsize=4)
def _build_identities(size: int, names: tuple[str, ...]) -> dict[str, Portrait]:
    face = DlibFace()
    bases: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    canvas = 2 * int(0.75 * size)  # derivations happen on a larger canvas, cropped at the end
    for name, photo in source_photos().items():
        lm = _detect_landmarks(face, photo, name)
        img, _ = canonical_crop(photo, lm, size, canvas)
        bases[name] = (img, _detect_landmarks(face, img, name))
    out: dict[str, Portrait] = {}
    for name in names:
        r = RECIPES[name]
        img, lm = bases[r["base"]]
        steps = [r["base"]]
        if r.get("flip"):
            img = np.ascontiguousarray(img[:, ::-1])
            lm = _detect_landmarks(face, img, name)
            steps.append("mirror")
        if "morph" in r:
            other, t = r["morph"]
            oimg, olm = bases[other]
            if r.get("flip"):
                oimg = np.ascontiguousarray(oimg[:, ::-1])
                olm = _detect_landmarks(face, oimg, other)
            img, lm = morph(img, lm, oimg, olm, t)
            steps.append(f"morph {t:.2f} towards {other}")
        if "shape" in r:
            img, lm = reshape(img, lm, r["shape"])
            steps.append(f"reshape {r['shape']}")
        if "gain" in r:
            img = recolor(img, r["gain"])
            steps.append(f"colour gain {r['gain']}")
        # re-align (a reshape may move the eyes) and take the detector's own landmarks
        lm = _detect_landmarks(face, img, name)
        img, _ = canonical_crop(img, lm, size)
        out[name] = Portrait(name, img, _detect_landmarks(face, img, name), "; ".join(steps))
    return out
