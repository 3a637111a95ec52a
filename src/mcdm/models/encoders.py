"""Encoders of the present-clip motion prior (paper Sec. 3.3; DECISIONS #2, #3).

Frozen encoders (DECISIONS #2: loaded from local weights, or a labelled fallback that is itself a real,
pretrained or closed-form computation; a random, untrained network is never a "frozen encoder"):

- audio:    ``wav2vec2`` -- ``Wav2Vec2Model.from_pretrained(local)``, hidden states resampled to the
            video frames; fallback ``logmel`` -- 80-bin log-mel frames averaged per video frame.
- identity: ``clip`` -- ``CLIPVisionModelWithProjection.from_pretrained(local)`` image embedding;
            fallback ``dlib+vae`` -- dlib's 128-d face descriptor + the tiny VAE's 2x2-pooled latent.

Motion encoders (the paper's supplement is unavailable; this is our design, DECISIONS #3):

- head:       head pose (pitch, yaw, roll, tx, ty, tz) fitted per frame from the 68 landmarks with
              ``cv2.solvePnP`` against ``FACE_3D_68``, a generic 3-D face defined below;
              ``HeadPoseEncoder`` only standardises it (statistics of the training clips).
- lip:        ``LipEncoder`` on a window of grayscale mouth crops, trained with InfoNCE against
              ``LipAudioEncoder`` on audio windows; negatives are the same clip's audio shifted in
              time (random shifts) plus the other clips of the batch (SyncNet-style objective).
- expression: ``ExpressionEncoder`` on pose-normalised 68-landmark offsets (similarity-Procrustes
              alignment on the rigid points, minus the clip's neutral face), trained as a denoising
              autoencoder: reconstruct the clean offsets from noisy / partly dropped ones through an
              ``expression_dim`` bottleneck. Its code is the expression token.
- landmarks:  ``LandmarkGuider`` (Moore-AnimateAnyone's pose guider: strided convs with a zero-initialised
              output conv) on rendered landmark heat maps; trained in stage 1, frozen after. Its pooled
              features are the landmark tokens that condition the prior when a driving video is given.

The feature computations that the ``features`` stage stores (``logmel_per_frame``,
``head_pose_from_landmarks``, ``expression_offsets``, ``mouth_boxes`` / ``mouth_crop``) live here too,
so that training and inference compute them one way.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from mcdm.errors import McdmError

AUDIO_RATE = 16000
HEAD_POSE_DIM = 6  # pitch, yaw, roll (radians), tx, ty, tz (inter-ocular units, camera frame)
MOUTH_CROP_HW = (32, 48)
N_LANDMARKS = 68


# =============================================================================================
# Loading helper
# =============================================================================================
def load_strict(cls, path: str | Path, **kwargs):
    """``cls.from_pretrained(path)`` that fails (one line) when a weight is missing or unexpected."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise McdmError(f"{path}: no config.json (not a saved {cls.__name__})")
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except (ValueError, OSError, RuntimeError) as err:
        raise McdmError(f"{path}: cannot load {cls.__name__}: {str(err).splitlines()[0]}") from None
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise McdmError(f"{path}: {cls.__name__} weights do not match its config: {bad or info['error_msgs']}")
    return model.eval()


# =============================================================================================
# Audio: log-mel fallback and wav2vec2, one feature row per video frame
# =============================================================================================
def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(hz < min_log_hz, hz / f_sp, min_log_mel + torch.log(hz.clamp(min=1e-10) / min_log_hz) / logstep)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(mel < min_log_mel, mel * f_sp, min_log_hz * torch.exp(logstep * (mel - min_log_mel)))


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: Optional[float] = None) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters on the Slaney mel scale, Slaney (area) normalised."""
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_hz = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    mel_pts = torch.linspace(float(hz_to_mel(torch.tensor(f_min))), float(hz_to_mel(torch.tensor(f_max))), n_mels + 2, dtype=torch.float64)
    hz_pts = mel_to_hz(mel_pts)
    lo, ctr, hi = hz_pts[:-2], hz_pts[1:-1], hz_pts[2:]
    up = (fft_hz[:, None] - lo) / (ctr - lo)
    down = (hi - fft_hz[:, None]) / (hi - ctr)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)
    return (fb * (2.0 / (hi - lo))).float()


def logmel(audio: torch.Tensor, sample_rate: int = AUDIO_RATE, n_mels: int = 80, n_fft: int = 512,
           win_length: int = 400, hop_length: int = 160, floor: float = 1e-6) -> torch.Tensor:
    """(J, n_mels) natural-log mel power spectrogram; frame j is centred at j * hop / rate seconds."""
    window = torch.hann_window(win_length, periodic=True, dtype=torch.float32)
    spec = torch.stft(audio.float(), n_fft=n_fft, hop_length=hop_length, win_length=win_length, window=window,
                      center=True, pad_mode="reflect", return_complex=True)
    power = spec.abs() ** 2  # (n_fft//2+1, J)
    mel = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate).T @ power
    return torch.log(mel.clamp(min=floor)).T


def logmel_per_frame(audio_16k: np.ndarray | torch.Tensor, fps: float, n_frames: Optional[int] = None,
                     n_mels: int = 80, sample_rate: int = AUDIO_RATE) -> np.ndarray:
    """(T, n_mels) log-mel features aligned to video frames (the ``logmel`` audio backend).

    Mel frames (25 ms Hann window, 10 ms hop) whose centre falls inside video frame t's interval
    [t / fps, (t + 1) / fps) are averaged; a frame with none (audio too short) takes the mel frame
    nearest to its centre. T = ``n_frames``, or round(duration * fps) when not given.
    """
    audio = torch.as_tensor(np.asarray(audio_16k, dtype=np.float32)).flatten()
    if audio.numel() == 0:
        raise McdmError("logmel_per_frame: empty audio")
    if n_frames is None:
        n_frames = max(1, int(round(audio.numel() / sample_rate * fps)))
    if audio.numel() < 400:  # shorter than one analysis window: pad with silence
        audio = F.pad(audio, (0, 400 - audio.numel()))
    mel = logmel(audio, sample_rate, n_mels)  # (J, n_mels)
    hop = 160
    # video frame whose interval holds mel frame j: floor(j hop fps / rate), multiplied before dividing
    # so that centres on a frame boundary (e.g. j = 4 at 25 fps) land exactly
    owner = torch.floor(torch.arange(mel.shape[0], dtype=torch.float64) * hop * fps / sample_rate).long()
    inside = owner < n_frames
    sums = torch.zeros(n_frames, n_mels).index_add_(0, owner[inside], mel[inside])
    counts = torch.zeros(n_frames).index_add_(0, owner[inside], torch.ones(int(inside.sum())))
    centre = (torch.arange(n_frames, dtype=torch.float64) + 0.5) / fps
    nearest = torch.round(centre * sample_rate / hop).long().clamp(0, mel.shape[0] - 1)
    out = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], mel[nearest])
    return out.numpy().astype(np.float32)


class LogMelAudio:
    """Fallback audio backend (DECISIONS #2): 80-bin log-mel per video frame. Label: ``logmel``."""

    name = "logmel"

    def __init__(self, n_mels: int = 80):
        self.dim = n_mels

    def __call__(self, audio_16k: np.ndarray, fps: float, n_frames: Optional[int] = None) -> np.ndarray:
        return logmel_per_frame(audio_16k, fps, n_frames, n_mels=self.dim)


class Wav2Vec2Audio:
    """Frozen Wav2Vec 2.0 from a local folder; last hidden states (50 Hz) linearly resampled to T frames."""

    name = "wav2vec2"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import Wav2Vec2Model

        path = Path(path)
        if not path.is_dir():
            raise McdmError(f"base_models.wav2vec2_path: {path} is not a folder")
        self.model = Wav2Vec2Model.from_pretrained(str(path)).eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.dim = int(self.model.config.hidden_size)
        pre = path / "preprocessor_config.json"
        self.normalize = json.loads(pre.read_text()).get("do_normalize", True) if pre.exists() else True

    @torch.no_grad()
    def __call__(self, audio_16k: np.ndarray, fps: float, n_frames: Optional[int] = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(audio_16k, dtype=np.float32)).flatten()
        if n_frames is None:
            n_frames = max(1, int(round(x.numel() / AUDIO_RATE * fps)))
        min_len = 400 * 2  # the conv feature extractor needs a few receptive fields
        if x.numel() < min_len:
            x = F.pad(x, (0, min_len - x.numel()))
        if self.normalize:
            x = (x - x.mean()) / torch.sqrt(x.var() + 1e-7)
        hidden = self.model(x[None].to(self.device)).last_hidden_state  # (1, N, dim) at ~50 Hz
        # resample to video frames: (1, dim, N) -> (1, dim, T)
        hidden = F.interpolate(rearrange(hidden, "b n d -> b d n"), size=n_frames, mode="linear", align_corners=False)
        return rearrange(hidden, "b d t -> (b t) d").float().cpu().numpy()


def load_audio_encoder(wav2vec2_path: Optional[str] = None, device: str | torch.device = "cpu"):
    """The audio backend of DECISIONS #2: wav2vec2 from a local folder when given, else ``logmel``."""
    return Wav2Vec2Audio(wav2vec2_path, device) if wav2vec2_path else LogMelAudio()


# =============================================================================================
# Identity / reference image: CLIP, or dlib descriptor + pooled VAE latent
# =============================================================================================
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipIdentity:
    """Frozen CLIP vision tower with projection from a local folder: ``image_embeds`` (projection_dim,)."""

    name = "clip"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPVisionModelWithProjection

        path = Path(path)
        if not path.is_dir():
            raise McdmError(f"base_models.clip_path: {path} is not a folder")
        self.model = CLIPVisionModelWithProjection.from_pretrained(str(path)).eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.dim = int(self.model.config.projection_dim)
        self.size = int(self.model.config.image_size)
        pre = path / "preprocessor_config.json"
        cfg = json.loads(pre.read_text()) if pre.exists() else {}
        self.mean = torch.tensor(cfg.get("image_mean", OPENAI_CLIP_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("image_std", OPENAI_CLIP_STD)).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray, landmarks: Optional[np.ndarray] = None) -> np.ndarray:
        x = torch.as_tensor(np.ascontiguousarray(rgb)).float().div(255.0)
        x = rearrange(x, "h w c -> 1 c h w")
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.device)
        return self.model(pixel_values=x).image_embeds[0].float().cpu().numpy()


class DlibVaeIdentity:
    """Fallback identity backend (DECISIONS #2), label ``dlib+vae``: dlib's pretrained 128-d face
    descriptor concatenated with the tiny VAE's latent mean, average-pooled to 2 x 2 (4 * latent ch)."""

    name = "dlib+vae"

    def __init__(self, vae, device: str | torch.device = "cpu"):
        from mcdm.face.dlib import DlibFace

        self.face = DlibFace()
        self.vae = vae.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.dim = 128 + 4 * int(vae.config.latent_channels)

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray, landmarks: Optional[np.ndarray] = None) -> np.ndarray:
        box = None
        if landmarks is not None:
            lo, hi = np.asarray(landmarks).min(0), np.asarray(landmarks).max(0)
            pad = 0.1 * (hi - lo)
            h, w = rgb.shape[:2]
            box = (int(max(lo[0] - pad[0], 0)), int(max(lo[1] - pad[1], 0)), int(min(hi[0] + pad[0], w - 1)), int(min(hi[1] + pad[1], h - 1)))
        desc = self.face.descriptor(rgb, box)
        if desc is None:
            raise McdmError("identity embedding: no face found in the reference image")
        x = torch.as_tensor(np.ascontiguousarray(rgb)).float().div(127.5).sub(1.0)
        x = rearrange(x, "h w c -> 1 c h w").to(self.device, self.vae.dtype)
        latent = self.vae.encode(x).latent_dist.mean * float(getattr(self.vae.config, "scaling_factor", 1.0))
        pooled = F.adaptive_avg_pool2d(latent.float(), 2).flatten().cpu().numpy()
        return np.concatenate([desc.astype(np.float32), pooled.astype(np.float32)])


def load_identity_encoder(clip_path: Optional[str] = None, vae_dir: Optional[str | Path] = None,
                          device: str | torch.device = "cpu"):
    """The identity backend of DECISIONS #2: CLIP from a local folder, else dlib + the VAE at ``vae_dir``."""
    if clip_path:
        return ClipIdentity(clip_path, device)
    if vae_dir is None:
        raise McdmError("identity encoder: no base_models.clip_path and no VAE folder for the dlib+vae fallback")
    from diffusers import AutoencoderKL

    return DlibVaeIdentity(load_strict(AutoencoderKL, vae_dir), device)


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


def _check_landmarks(landmarks: np.ndarray, what: str) -> np.ndarray:
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

    lm = _check_landmarks(landmarks, "head_pose_from_landmarks")
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
    lm = _check_landmarks(landmarks, "align_to_canonical")
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


MOUTH_CROP_WIDTH_IOD = 1.6  # mouth crop width in inter-ocular distances (the mouth spans ~0.93)


def mouth_boxes(landmarks: np.ndarray, smooth: int = 5) -> np.ndarray:
    """(T, 4) mouth-crop boxes ``cx, cy, angle, iod`` (pixels, radians, pixels): centre = mean of the
    20 mouth points, angle = eye line, scale = inter-ocular distance (stable, unlike the mouth width,
    which changes with expression). Smoothed over ``smooth`` frames so the crop does not jitter."""
    lm = _check_landmarks(landmarks, "mouth_boxes")
    el, er = lm[:, 36:42].mean(1), lm[:, 42:48].mean(1)
    d = er - el
    boxes = np.column_stack([lm[:, 48:68].mean(1), np.arctan2(d[:, 1], d[:, 0]), np.linalg.norm(d, axis=1)])
    if smooth > 1 and len(boxes) > 1:
        from scipy.ndimage import uniform_filter1d

        boxes = uniform_filter1d(boxes, size=smooth, axis=0, mode="nearest")
    return boxes.astype(np.float32)


def mouth_crop(frame: np.ndarray, landmarks: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None) -> np.ndarray:
    """(32, 48) uint8 grayscale mouth crop, upright (eye line horizontal), ``MOUTH_CROP_WIDTH_IOD`` wide.

    Give the frame's (68, 2) ``landmarks``, or a ``box`` row of ``mouth_boxes`` (temporally smoothed).
    """
    import cv2

    if box is None:
        if landmarks is None:
            raise McdmError("mouth_crop: give landmarks or a box")
        box = mouth_boxes(np.asarray(landmarks)[None], smooth=1)[0]
    cx, cy, angle, iod = (float(v) for v in box)
    out_h, out_w = MOUTH_CROP_HW
    scale = out_w / max(MOUTH_CROP_WIDTH_IOD * iod, 1e-3)  # output pixels per source pixel
    gray = frame if frame.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    # when shrinking, warp at source resolution first and then area-downsample, so large crops do not alias
    ww, wh = (out_w, out_h) if scale >= 1.0 else (int(math.ceil(out_w / scale)), int(math.ceil(out_h / scale)))
    s = ww / max(MOUTH_CROP_WIDTH_IOD * iod, 1e-3)
    cos, sin = math.cos(-angle) * s, math.sin(-angle) * s
    # dest = s R(-angle) (src - c) + (ww/2, wh/2)
    m = np.array([[cos, -sin, ww / 2.0 - (cos * cx - sin * cy)], [sin, cos, wh / 2.0 - (sin * cx + cos * cy)]])
    crop = cv2.warpAffine(gray, m, (ww, wh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if (ww, wh) != (out_w, out_h):
        crop = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA)
    return crop.astype(np.uint8)


def render_landmark_heatmaps(landmarks: np.ndarray | torch.Tensor, size: int, sigma: Optional[float] = None) -> torch.Tensor:
    """(..., 1, size, size) landmark images for the landmark guider: max over the 68 points of a
    Gaussian blob exp(-|p - l_i|^2 / (2 sigma^2)), sigma = size / 64 (at least 1 pixel).

    The blob is separable, exp(-(y - l_y)^2 / 2s^2) exp(-(x - l_x)^2 / 2s^2): 68 (H + W) exponentials
    and one product per pixel instead of 68 H W exponentials (the training stages' data loading was
    dominated by them)."""
    lm = torch.as_tensor(np.asarray(landmarks) if not torch.is_tensor(landmarks) else landmarks).float()
    lead = lm.shape[:-2]
    lm = lm.reshape(-1, N_LANDMARKS, 2)
    sigma = float(sigma or max(size / 64.0, 1.0))
    grid = torch.arange(size, dtype=torch.float32)
    out = []
    per_chunk = max(1, int(2e7 // (N_LANDMARKS * size * size)))  # bounds the (n, 68, H, W) buffer to ~80 MB
    for chunk in lm.split(per_chunk):
        gx = torch.exp(-((grid[None, None, :] - chunk[..., 0:1]) ** 2) / (2 * sigma**2))  # (n, 68, W)
        gy = torch.exp(-((grid[None, None, :] - chunk[..., 1:2]) ** 2) / (2 * sigma**2))  # (n, 68, H)
        out.append((gy[..., :, None] * gx[..., None, :]).amax(1))  # (n, 68, H, W) -> (n, H, W)
    return torch.cat(out).reshape(*lead, 1, size, size)


# =============================================================================================
# Motion encoders (trained by the motion_encoders stage, frozen after)
# =============================================================================================
def _standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


class HeadPoseEncoder(ModelMixin, ConfigMixin):
    """Head token = head pose (T, 6) standardised with the training clips' mean / std (no weights)."""

    @register_to_config
    def __init__(self, head_dim: int = HEAD_POSE_DIM):
        super().__init__()
        self.register_buffer("token_mean", torch.zeros(head_dim))
        self.register_buffer("token_std", torch.ones(head_dim))

    def fit(self, poses: torch.Tensor) -> "HeadPoseEncoder":
        self.token_mean.copy_(poses.mean(0))
        self.token_std.copy_(poses.std(0).clamp(min=1e-3))
        return self

    def forward(self, head_pose: torch.Tensor) -> torch.Tensor:
        return _standardise(head_pose.float().to(self.token_mean.device), self.token_mean, self.token_std)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.token_std + self.token_mean


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU())


def frame_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(T, ...) -> (T, window, ...): the ``window`` frames centred on each frame, edges repeated."""
    half = window // 2
    steps = torch.arange(-half, window - half, device=x.device)
    idx = (torch.arange(x.shape[0], device=x.device)[:, None] + steps[None]).clamp(0, x.shape[0] - 1)
    return x[idx]


class LipEncoder(ModelMixin, ConfigMixin):
    """Lip token from a window of grayscale mouth crops (window frames stacked as channels, SyncNet's
    early fusion): (B, W, 32, 48) -> (B, lip_dim). Trained with InfoNCE against ``LipAudioEncoder``."""

    @register_to_config
    def __init__(self, window: int = 5, lip_dim: int = 16, channels: Sequence[int] = (16, 32, 64)):
        super().__init__()
        layers, c_prev = [], window
        for i, c in enumerate(channels):
            layers.append(_conv_block(c_prev, c, stride=1 if i == 0 else 2))
            c_prev = c
        self.convs = nn.Sequential(*layers, _conv_block(c_prev, c_prev, 2))
        self.proj = nn.Linear(c_prev, lip_dim)
        self.register_buffer("token_mean", torch.zeros(lip_dim))
        self.register_buffer("token_std", torch.ones(lip_dim))

    def forward(self, mouth_windows: torch.Tensor) -> torch.Tensor:
        """Unit-norm embedding (the contrastive space)."""
        x = mouth_windows.float()
        x = (x / 255.0 - 0.5) / 0.25 if mouth_windows.dtype == torch.uint8 else x
        h = self.convs(x).mean((-2, -1))  # (B, C)
        return F.normalize(self.proj(h), dim=-1)

    @torch.no_grad()
    def encode_clip(self, mouth_crops: torch.Tensor) -> torch.Tensor:
        """(T, 32, 48) uint8 mouth crops -> (T, lip_dim) standardised lip tokens."""
        windows = frame_windows(mouth_crops.to(self.device), self.config.window)
        emb = torch.cat([self(w) for w in windows.split(256)])
        return _standardise(emb * math.sqrt(self.config.lip_dim), self.token_mean, self.token_std)


class LipAudioEncoder(ModelMixin, ConfigMixin):
    """Audio side of the lip contrastive objective: (B, W, A) audio window -> (B, lip_dim) unit norm.

    Audio features are standardised per channel with statistics of the training frames (``fit``), not
    per frame: a per-frame LayerNorm would erase loudness, the strongest cue of mouth opening."""

    @register_to_config
    def __init__(self, audio_dim: int = 80, window: int = 5, lip_dim: int = 16, hidden: int = 128):
        super().__init__()
        self.register_buffer("audio_mean", torch.zeros(audio_dim))
        self.register_buffer("audio_std", torch.ones(audio_dim))
        self.conv = nn.Sequential(nn.Conv1d(audio_dim, hidden, 3, padding=1), nn.SiLU(), nn.Conv1d(hidden, hidden, 3, padding=1), nn.SiLU())
        self.proj = nn.Linear(hidden * window, lip_dim)

    def fit(self, audio_frames: torch.Tensor) -> "LipAudioEncoder":
        """Per-channel mean / std of (N, A) training audio frames."""
        self.audio_mean.copy_(audio_frames.float().mean(0))
        self.audio_std.copy_(audio_frames.float().std(0).clamp(min=1e-3))
        return self

    def forward(self, audio_windows: torch.Tensor) -> torch.Tensor:
        a = _standardise(audio_windows.float(), self.audio_mean, self.audio_std)
        h = self.conv(rearrange(a, "b w a -> b a w"))
        return F.normalize(self.proj(rearrange(h, "b c w -> b (c w)")), dim=-1)


class ExpressionEncoder(ModelMixin, ConfigMixin):
    """Expression token from pose-normalised landmark offsets: MLP encoder to an ``expression_dim``
    bottleneck and an MLP decoder, trained as a denoising autoencoder (see module docstring)."""

    @register_to_config
    def __init__(self, in_dim: int = 2 * N_LANDMARKS, expression_dim: int = 16, hidden: int = 128):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, expression_dim))
        self.decoder = nn.Sequential(nn.Linear(expression_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, in_dim))
        self.register_buffer("input_scale", torch.ones(()))  # global std of the training offsets
        self.register_buffer("token_mean", torch.zeros(expression_dim))
        self.register_buffer("token_std", torch.ones(expression_dim))

    def forward(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 136) offsets -> (code, reconstruction in offset units)."""
        code = self.encoder(offsets.float() / self.input_scale)
        return code, self.decoder(code) * self.input_scale

    @torch.no_grad()
    def encode_clip(self, offsets: torch.Tensor) -> torch.Tensor:
        """(T, 136) offsets -> (T, expression_dim) standardised expression tokens."""
        code = self.encoder(offsets.float().to(self.device) / self.input_scale)
        return _standardise(code, self.token_mean, self.token_std)


class LandmarkGuider(ModelMixin, ConfigMixin):
    """Landmark guider (Moore-AnimateAnyone's pose guider): landmark images (N, 1, H, W) ->
    - ``forward``: (N, embedding_channels, H / 2^k, W / 2^k) with k = len(block_out_channels) - 1, from a
      zero-initialised output conv (added to the UNet's noisy latents in stage 1; starts as no-op);
    - ``tokens``: (N, 4 * block_out_channels[-1]) the last features average-pooled to 2 x 2 (the
      landmark / head condition tokens of the present-clip prior). Trained in stage 1, frozen after.
    Choose ``block_out_channels`` so that 2^k equals the VAE's downsampling factor."""

    @register_to_config
    def __init__(self, conditioning_channels: int = 1, embedding_channels: int = 4, block_out_channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(conditioning_channels, chans[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2), nn.SiLU()]
        self.blocks = nn.Sequential(*blocks)
        self.conv_out = nn.Conv2d(chans[-1], embedding_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def token_dim(self) -> int:
        return 4 * int(self.config.block_out_channels[-1])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(F.silu(self.conv_in(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.features(images))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(images), 2).flatten(1)

    def landmark_tokens(self, landmarks: torch.Tensor, image_size: int) -> torch.Tensor:
        """(B, F, 68, 2) crop-pixel landmarks -> (B, F, token_dim) landmark tokens for the prior."""
        b = landmarks.shape[0]
        images = render_landmark_heatmaps(rearrange(landmarks, "b f p c -> (b f) p c").cpu(), image_size).to(self.device)
        return rearrange(self.tokens(images), "(b f) d -> b f d", b=b)


# =============================================================================================
# The motion tokens of a clip (what stage 2 denoises and what F_pc is made from)
# =============================================================================================
@dataclass
class MotionEncoders:
    head: HeadPoseEncoder
    lip: LipEncoder
    lip_audio: LipAudioEncoder
    expression: ExpressionEncoder

    SUBFOLDERS = ("head", "lip", "lip_audio", "expression")

    def save(self, out_dir: str | Path) -> None:
        for name in self.SUBFOLDERS:
            getattr(self, name).save_pretrained(Path(out_dir) / name)

    @classmethod
    def load(cls, directory: str | Path) -> "MotionEncoders":
        directory = Path(directory)
        if not directory.is_dir():
            raise McdmError(f"missing {directory}: run `dvc repro motion_encoders` first")
        kinds = {"head": HeadPoseEncoder, "lip": LipEncoder, "lip_audio": LipAudioEncoder, "expression": ExpressionEncoder}
        return cls(**{n: load_strict(kinds[n], directory / n).requires_grad_(False) for n in cls.SUBFOLDERS})

    @property
    def dims(self) -> dict[str, int]:
        return {"head": self.head.config.head_dim, "lip": self.lip.config.lip_dim, "expression": self.expression.config.expression_dim}

    @torch.no_grad()
    def tokens(self, features: dict) -> dict[str, torch.Tensor]:
        """Per-frame motion tokens of a whole clip from its feature file's arrays:
        ``head_pose`` (T, 6), ``mouth_crops`` (T, 32, 48) uint8, ``landmarks`` (T, 68, 2) ->
        ``head`` (T, 6), ``lip`` (T, lip_dim), ``expression`` (T, expression_dim), all standardised."""
        missing = [k for k in ("head_pose", "mouth_crops", "landmarks") if k not in features]
        if missing:
            raise McdmError(f"motion tokens: feature file lacks {', '.join(missing)}")
        head_pose = torch.as_tensor(np.asarray(features["head_pose"])).float()
        mouths = torch.as_tensor(np.asarray(features["mouth_crops"]))
        offsets = torch.as_tensor(expression_offsets(np.asarray(features["landmarks"])))
        return {"head": self.head(head_pose), "lip": self.lip.encode_clip(mouths), "expression": self.expression.encode_clip(offsets)}
