"""Face geometry on 68 landmarks (iBUG 300-W order): a canonical frontal face, head pose fitted
with a generic 3-D face, similarity-Procrustes alignment and pose-normalised expression offsets.
"""
from __future__ import annotations

import math

import numpy as np
from einops import rearrange

from mcdm.errors import McdmError

HEAD_POSE_DIM = 6  # pitch, yaw, roll (radians), tx, ty, tz (inter-ocular units, camera frame)


N_LANDMARKS = 68


# =============================================================================================
# Face geometry: canonical 68-point face, head pose, expression offsets, mouth crops
# =============================================================================================
# Canonical frontal 68-point face (iBUG 300-W order), x right, y down, inter-ocular distance 1 (eye
# centres at x = -/+0.5). Derived once for this project: dlib's 68 landmarks on two public photos
# (scikit-image's ``astronaut``, matplotlib's ``grace_hopper``), similarity-aligned and averaged, then
# made left-right symmetric and rounded. It only defines the canonical frame (expression offsets
# subtract a neutral face, see ``expression_offsets``), so a generic shape is enough.
CANONICAL_68 = np.array([
    [-1.062, -0.487], [-1.036, -0.214], [-0.999, 0.053], [-0.954, 0.317], [-0.848, 0.558], [-0.696, 0.759],
    [-0.488, 0.924], [-0.258, 1.052], [0.0, 1.091], [0.258, 1.052], [0.488, 0.924], [0.696, 0.759],
    [0.848, 0.558], [0.954, 0.317], [0.999, 0.053], [1.036, -0.214], [1.062, -0.487],  # jaw 0-16
    [-0.903, -0.719], [-0.784, -0.876], [-0.597, -0.915], [-0.401, -0.89], [-0.225, -0.811],  # brow 17-21
    [0.225, -0.811], [0.401, -0.89], [0.597, -0.915], [0.784, -0.876], [0.903, -0.719],  # brow 22-26
    [0.0, -0.558], [0.0, -0.382], [0.0, -0.201], [0.0, -0.019],  # nose bridge 27-30
    [-0.238, 0.081], [-0.122, 0.112], [0.0, 0.146], [0.122, 0.112], [0.238, 0.081],  # nostrils 31-35
    [-0.682, -0.543], [-0.568, -0.609], [-0.429, -0.609], [-0.304, -0.509], [-0.437, -0.492], [-0.58, -0.486],  # eye 36-41
    [0.304, -0.509], [0.429, -0.609], [0.568, -0.609], [0.682, -0.543], [0.58, -0.486], [0.437, -0.492],  # eye 42-47
    [-0.466, 0.345], [-0.29, 0.325], [-0.114, 0.312], [0.0, 0.344], [0.114, 0.312], [0.29, 0.325],
    [0.466, 0.345], [0.295, 0.524], [0.128, 0.598], [0.0, 0.612], [-0.128, 0.598], [-0.295, 0.524],  # outer lip 48-59
    [-0.401, 0.362], [-0.119, 0.398], [0.0, 0.412], [0.119, 0.398], [0.401, 0.362],
    [0.119, 0.478], [0.0, 0.481], [-0.119, 0.478],  # inner lip 60-67
], dtype=np.float64)


# Left-right mirror permutation of the 68 points (point i of a mirrored face is point MIRROR_68[i]).
MIRROR_68 = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40] + [54, 53, 52, 51, 50, 49, 48]
    + [59, 58, 57, 56, 55] + [64, 63, 62, 61, 60] + [67, 66, 65]
)


# Points that move little with expression: upper jaw (near the ears), nose, eye contours. Pose and
# alignment are fitted on these only, so a smile or an open mouth does not read as head motion.
RIGID_POINTS = np.array([0, 1, 2, 14, 15, 16] + list(range(27, 48)))


def _face_3d_68() -> np.ndarray:
    """Generic 3-D face in OpenCV camera axes at identity pose (x right, y down, z away from the camera).

    Depth is a crude head model defined here: a parabolic cylinder ``z = 0.55 x^2`` (the cheeks and jaw
    recede towards the ears) plus the protrusion of nose, lips, brows and chin and the recess of the
    eyes, in inter-ocular units. Good enough for a pose *token*; swap in a 3DMM mean shape for metric pose.
    """
    xy = CANONICAL_68
    z = 0.55 * xy[:, 0] ** 2
    relief = {27: -0.12, 28: -0.25, 29: -0.38, 30: -0.50, 31: -0.22, 32: -0.30, 33: -0.35, 34: -0.30, 35: -0.22}
    relief.update({i: 0.05 for i in range(36, 48)})  # eyes sit in their sockets
    relief.update({i: -0.05 for i in range(17, 27)})  # brow ridge
    relief.update({i: -0.12 for i in range(49, 54)})
    relief.update({i: -0.12 for i in range(55, 60)})
    relief.update({i: -0.10 for i in range(60, 68)})
    relief.update({48: -0.04, 54: -0.04, 7: -0.08, 8: -0.10, 9: -0.08})
    for i, dz in relief.items():
        z[i] += dz
    return np.column_stack([xy, z]).astype(np.float64)


FACE_3D_68 = _face_3d_68()


def check_landmarks(landmarks: np.ndarray, what: str) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim == 2:
        lm = lm[None]
    if lm.ndim != 3 or lm.shape[1:] != (N_LANDMARKS, 2):
        raise McdmError(f"{what}: landmarks must have shape (T, 68, 2), got {tuple(np.shape(landmarks))}")
    if not np.isfinite(lm).all():
        raise McdmError(f"{what}: landmarks hold NaN or inf")
    return lm


def euler_from_matrix(rot: np.ndarray) -> tuple[float, float, float]:
    """(pitch, yaw, roll) with R = Rz(roll) @ Ry(yaw) @ Rx(pitch)."""
    yaw = math.asin(float(np.clip(-rot[2, 0], -1.0, 1.0)))
    pitch = math.atan2(rot[2, 1], rot[2, 2])
    roll = math.atan2(rot[1, 0], rot[0, 0])
    return pitch, yaw, roll


def head_pose_from_landmarks(landmarks: np.ndarray, image_size: int | tuple[int, int]) -> np.ndarray:
    """(T, 6) head pose per frame: pitch, yaw, roll (radians) and translation tx, ty, tz (camera frame,
    inter-ocular units) of ``FACE_3D_68`` fitted to the 2-D landmarks (crop pixels).

    Pinhole camera with focal length = image width (about 53 degrees of view), principal point at the
    centre. ``cv2.solvePnP`` (Levenberg-Marquardt) on ``RIGID_POINTS``, started from the previous frame's
    pose (the first frame from a frontal pose at the distance that matches its eye spacing).
    """
    import cv2

    lm = check_landmarks(landmarks, "head_pose_from_landmarks")
    w, h = (image_size, image_size) if np.isscalar(image_size) else image_size
    focal = float(w)
    cam = np.array([[focal, 0, w / 2.0], [0, focal, h / 2.0], [0, 0, 1]], dtype=np.float64)
    obj = FACE_3D_68[RIGID_POINTS]
    out = np.zeros((lm.shape[0], HEAD_POSE_DIM), dtype=np.float32)
    rvec = tvec = None
    for t, pts in enumerate(lm):
        img = np.ascontiguousarray(pts[RIGID_POINTS])
        if rvec is None:  # frontal start at the depth where the eye spacing matches
            iod_px = max(np.linalg.norm(pts[42:48].mean(0) - pts[36:42].mean(0)), 1e-3)
            tz = focal / iod_px
            c = pts[RIGID_POINTS].mean(0) - obj[:, :2].mean(0) * focal / tz
            rvec = np.zeros((3, 1))
            tvec = np.array([[(c[0] - w / 2.0) * tz / focal], [(c[1] - h / 2.0) * tz / focal], [tz]])
        ok, rvec, tvec = cv2.solvePnP(obj, img, cam, None, rvec.copy(), tvec.copy(), useExtrinsicGuess=True,
                                      flags=cv2.SOLVEPNP_ITERATIVE)
        if not ok or tvec[2, 0] <= 0:
            raise McdmError(f"head_pose_from_landmarks: pose fit failed at frame {t}")
        rot, _ = cv2.Rodrigues(rvec)
        out[t, :3] = euler_from_matrix(rot)
        out[t, 3:] = tvec[:, 0]
    return out


def align_to_canonical(landmarks: np.ndarray) -> np.ndarray:
    """(T, 68, 2) landmarks mapped by the similarity (rotation, scale, translation; no reflection) that
    best fits their ``RIGID_POINTS`` onto ``CANONICAL_68`` in least squares.

    Closed form with complex numbers: for centred points z (source) and w (target), the best
    rotation-and-scale is a = sum(conj(z) w) / sum(|z|^2) (2-D Procrustes / Umeyama without reflection).
    """
    lm = check_landmarks(landmarks, "align_to_canonical")
    z = lm[..., 0] + 1j * lm[..., 1]  # (T, 68)
    w = CANONICAL_68[:, 0] + 1j * CANONICAL_68[:, 1]
    zr, wr = z[:, RIGID_POINTS], w[RIGID_POINTS]
    z_mu, w_mu = zr.mean(1, keepdims=True), wr.mean()
    zc, wc = zr - z_mu, wr - w_mu
    a = (np.conj(zc) * wc).sum(1, keepdims=True) / (np.abs(zc) ** 2).sum(1, keepdims=True).clip(min=1e-12)
    aligned = a * (z - z_mu) + w_mu
    return np.stack([aligned.real, aligned.imag], -1)


def expression_offsets(landmarks: np.ndarray, neutral: str | np.ndarray = "clip") -> np.ndarray:
    """(T, 136) pose-normalised expression offsets (x, y of the 68 points, inter-ocular units).

    1. Similarity-Procrustes alignment of every frame to ``CANONICAL_68`` on the rigid points (removes
       in-plane rotation, scale and position: pose-normalised).
    2. Minus a neutral face: ``"clip"`` (default) = the per-point median of the clip's aligned frames,
       i.e. this speaker's own face shape, so the offsets hold expression motion and not identity;
       ``"template"`` = ``CANONICAL_68``; or an aligned (68, 2) array (e.g. a reference frame's).
    Out-of-plane rotation (yaw, pitch) is not removed by a 2-D similarity; it is small in talking-head
    clips and is carried separately by the head token.
    """
    aligned = align_to_canonical(landmarks)
    if isinstance(neutral, str):
        if neutral == "clip":
            ref = np.median(aligned, axis=0)
        elif neutral == "template":
            ref = CANONICAL_68
        else:
            raise McdmError(f"expression_offsets: neutral must be 'clip', 'template' or an array, got {neutral!r}")
    else:
        ref = np.asarray(neutral, dtype=np.float64).reshape(N_LANDMARKS, 2)
    return rearrange(aligned - ref, "t p c -> t (p c)").astype(np.float32)
