"""The evaluation metrics of MCDM (paper Sec. 4: FID, FVD, Sync-C/D, SSIM, E-FID) plus identity drift.

Every metric returns a ``MetricResult`` whose ``backend`` names what produced the number (the
paper's network given by local path, or a labelled fallback; see ``mcdm.eval.detectors`` and ``mcdm.eval.landmark_features``), and
``MetricSuite`` turns ``EvalParams`` into one flat ``{metric: value, metric + "_backend": label}``
dict for metrics.json / MLflow / the report.

Inputs: frames are RGB uint8 ``(N, H, W, 3)``; videos are sequences of ``(T, H, W, 3)`` (numpy or
torch, channel-last).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mcdm.config import EvalParams
from mcdm.errors import McdmError
from mcdm.eval.detectors import Deep3DExpression, I3DFeatures, InceptionFeatures, as_frames, as_videos, split_clips
from mcdm.eval.face_features import DlibDescriptorFeatures, DlibFrameFeatures
from mcdm.eval.frechet import frechet_from_features
from mcdm.eval.landmark_features import (
    DynamicsVideoFeatures,
    clip_dynamics_parts,
    expression_template,
    fill_missing,
    landmark_expression_features,
)
from mcdm.models.sync.scoring import sync_scores
from mcdm.models.sync.syncnet import load_syncnet


@dataclass
class MetricResult:
    name: str
    value: float
    backend: str
    n: int  # samples behind the value (frames, clips, windows)
    details: dict = field(default_factory=dict)  # counts worth reporting (e.g. frames without a face)

    def flat(self) -> dict:
        out = {self.name: self.value, f"{self.name}_backend": self.backend, f"{self.name}_n": self.n}
        out.update({f"{self.name}_{k}": v for k, v in self.details.items()})
        return out


def _finite_rows(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x.reshape(len(x), -1)).all(axis=1)


def _frechet_result(name: str, backend: str, real: np.ndarray, fake: np.ndarray, unit: str, details: dict) -> MetricResult:
    """Fréchet distance of two feature sets whose NaN rows (no face) are dropped and counted."""
    ok_r, ok_f = _finite_rows(real), _finite_rows(fake)
    details = {**details, f"no_face_{unit}_real": int((~ok_r).sum()), f"no_face_{unit}_fake": int((~ok_f).sum())}
    if ok_r.sum() < 2 or ok_f.sum() < 2:
        raise McdmError(
            f"{name}: need at least 2 {unit} with features in each set (real {int(ok_r.sum())}, fake {int(ok_f.sum())}; "
            f"{details[f'no_face_{unit}_real']} / {details[f'no_face_{unit}_fake']} without a face)"
        )
    value = frechet_from_features(real[ok_r], fake[ok_f])
    return MetricResult(name, value, backend, int(ok_f.sum()), details)


# ---------------------------------------------------------------------------------------------
# SSIM (Wang, Bovik, Sheikh & Simoncelli 2004)

SSIM_BACKEND = "ssim-wang2004:gaussian11-sigma1.5-per-channel"


def _gaussian_taps(sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(a, b, data_range: float, channel_axis: int | None = -1, k1: float = 0.01, k2: float = 0.03,
         sigma: float = 1.5) -> float | np.ndarray:
    """Mean SSIM of ``a`` vs ``b`` per image, in float64.

    Layout: ``(H, W, C)`` or ``(N, H, W, C)`` with ``channel_axis=-1``; ``(H, W)`` or ``(N, H, W)``
    with ``channel_axis=None`` (numpy or torch). Colour images: SSIM per channel, then the mean
    over channels (scikit-image's ``structural_similarity(..., channel_axis=-1)``). Returns a float
    for one image, an ``(N,)`` array for a batch.

    Per pixel, with Gaussian-weighted local statistics (11 taps, sigma 1.5, population variances):
        SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),
        C1 = (K1 L)^2, C2 = (K2 L)^2, L = data_range,
    averaged over the pixels whose window lies inside the image (a "valid" filter, which is
    scikit-image's crop of (win - 1) / 2 pixels at each border).
    """
    x = a.detach().cpu().to(torch.float64) if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a, np.float64))
    y = b.detach().cpu().to(torch.float64) if isinstance(b, torch.Tensor) else torch.from_numpy(np.array(b, np.float64))
    if x.shape != y.shape:
        raise McdmError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    if data_range <= 0:
        raise McdmError(f"ssim: data_range must be > 0 (got {data_range})")
    spatial = 2 if channel_axis is None else 3
    single = x.ndim == spatial
    if x.ndim not in (spatial, spatial + 1):
        raise McdmError(f"ssim: expected {'(N,) H, W' if channel_axis is None else '(N,) H, W, C'}; got {tuple(x.shape)}")
    if single:
        x, y = x[None], y[None]
    if channel_axis is None:
        x, y = x[:, None], y[:, None]  # (N, 1, H, W)
    else:
        x, y = torch.movedim(x, channel_axis, 1), torch.movedim(y, channel_axis, 1)  # (N, C, H, W)
    n, c, h, w = x.shape
    taps = _gaussian_taps(sigma)
    if min(h, w) < len(taps):
        raise McdmError(f"ssim: images must be at least {len(taps)} px on each side; got {h}x{w}")
    kv, kh = taps.view(1, 1, -1, 1), taps.view(1, 1, 1, -1)

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian filter, valid region only
        return F.conv2d(F.conv2d(z.reshape(n * c, 1, h, w), kv), kh)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    per_image = s_map.reshape(n, -1).mean(dim=1).numpy()
    return float(per_image[0]) if single else per_image


def ssim_curve(real_video, fake_video, data_range: float = 255.0, batch: int = 64) -> np.ndarray:
    """Per-frame SSIM of a generated video against its ground truth (common length)."""
    real, fake = as_frames(real_video, "real video"), as_frames(fake_video, "fake video")
    if real.shape[1:] != fake.shape[1:]:
        raise McdmError(f"ssim: frame sizes differ (real {real.shape[1:3]}, fake {fake.shape[1:3]})")
    t = min(len(real), len(fake))
    return np.concatenate([ssim(real[s:s + batch], fake[s:s + batch], data_range) for s in range(0, t, batch)])


def ssim_metric(real_videos, fake_videos, data_range: float = 255.0) -> MetricResult:
    """Mean SSIM over all frames paired by index (each pair of videos cut to its common length)."""
    real, fake = as_videos(real_videos, "real videos"), as_videos(fake_videos, "fake videos")
    if len(real) != len(fake):
        raise McdmError(f"ssim: {len(real)} real videos but {len(fake)} generated")
    curves = [ssim_curve(r, f, data_range) for r, f in zip(real, fake)]
    unpaired = sum(abs(len(r) - len(f)) for r, f in zip(real, fake))
    values = np.concatenate(curves)
    return MetricResult("ssim", float(values.mean()), SSIM_BACKEND, len(values), {"unpaired_frames": unpaired})


# ---------------------------------------------------------------------------------------------
# FID, FVD, E-FID


def fid(real_frames, fake_frames, backend: InceptionFeatures | DlibDescriptorFeatures | str | Path | None = None,
        faces: DlibFrameFeatures | None = None) -> MetricResult:
    """FID between two frame sets.

    ``backend``: an ``InceptionFeatures`` (or the path of the TorchScript Inception), else the
    ``dlib-descriptor-128`` fallback; frames without a face are counted, not silently dropped.
    """
    if isinstance(backend, (str, Path)):
        backend = InceptionFeatures(backend)
    backend = backend or DlibDescriptorFeatures(faces)
    real, fake = as_frames(real_frames, "real frames"), as_frames(fake_frames, "fake frames")
    return _frechet_result("fid", backend.label, backend(real), backend(fake), "frames", {})


def fvd(real_videos, fake_videos, backend: I3DFeatures | DynamicsVideoFeatures | str | Path | None = None,
        faces: DlibFrameFeatures | None = None, clip_frames: int = 16) -> MetricResult:
    """FVD over all non-overlapping ``clip_frames``-frame clips of the videos.

    ``backend``: an ``I3DFeatures`` (or the path of ``i3d_torchscript.pt``), else the
    ``fvd-fallback:dlib-descriptor+landmark-dynamics`` features (landmark template from the real set).
    """
    if isinstance(backend, (str, Path)):
        backend = I3DFeatures(backend)
    backend = backend or DynamicsVideoFeatures(faces)
    real, fake = as_videos(real_videos, "real videos"), as_videos(fake_videos, "fake videos")
    real_clips, _, short_r = split_clips(real, clip_frames)
    fake_clips, _, short_f = split_clips(fake, clip_frames)
    details = {"short_videos_real": short_r, "short_videos_fake": short_f}
    if isinstance(backend, I3DFeatures):
        if len(real_clips) < 2 or len(fake_clips) < 2:
            raise McdmError(f"fvd: need at least 2 clips of {clip_frames} frames per set "
                            f"(real {len(real_clips)}, fake {len(fake_clips)})")
        return _frechet_result("fvd", backend.label, backend(real_clips), backend(fake_clips), "clips", details)
    template = backend.template(real_clips)
    real_f, drop_r = backend(real_clips, template)
    fake_f, drop_f = backend(fake_clips, template)
    details.update(no_face_clips_real=drop_r, no_face_clips_fake=drop_f)
    if len(real_f) < 2 or len(fake_f) < 2:
        raise McdmError(
            f"fvd: need at least 2 clips of {clip_frames} frames with a face per set (real {len(real_f)}, fake {len(fake_f)}; "
            f"dropped {drop_r} / {drop_f} without a face, {short_r} / {short_f} videos too short)"
        )
    value = frechet_from_features(real_f, fake_f)
    # the same distance on each part of the feature vector (not additive: the parts correlate)
    for part, cols in clip_dynamics_parts(clip_frames).items():
        details[f"part_{part}"] = frechet_from_features(real_f[:, cols], fake_f[:, cols])
    return MetricResult("fvd", value, backend.label, len(fake_f), details)


EFID_FALLBACK = "landmark-expression-offsets"


def efid(real_landmarks, fake_landmarks, backend: Deep3DExpression | str | Path | None = None, *,
         real_frames=None, fake_frames=None) -> MetricResult:
    """E-FID: Fréchet distance of expression features.

    Fallback (``backend=None``): ``landmark-expression-offsets`` of ``(N, 68, 2)`` landmarks, both
    sets aligned to the real set's Procrustes template. With a ``Deep3DExpression`` (or its path),
    the 64 Deep3DFaceRecon expression coefficients of ``real_frames`` / ``fake_frames``, cropped
    around the landmarks. Frames whose landmarks are NaN (no face) are counted and left out.
    """
    real_lm, fake_lm = np.asarray(real_landmarks, np.float64), np.asarray(fake_landmarks, np.float64)
    for what, lm in (("real", real_lm), ("fake", fake_lm)):
        if lm.ndim != 3 or lm.shape[1:] != (68, 2):
            raise McdmError(f"efid: {what} landmarks must be (N, 68, 2); got {lm.shape}")
    ok_r, ok_f = _finite_rows(real_lm), _finite_rows(fake_lm)
    if isinstance(backend, (str, Path)):
        backend = Deep3DExpression(backend)
    if backend is None:
        template = expression_template(real_lm[ok_r])
        feats_r = np.full((len(real_lm), 84), np.nan)
        feats_f = np.full((len(fake_lm), 84), np.nan)
        if ok_r.any():
            feats_r[ok_r] = landmark_expression_features(real_lm[ok_r], template)
        if ok_f.any():
            feats_f[ok_f] = landmark_expression_features(fake_lm[ok_f], template)
        return _frechet_result("efid", EFID_FALLBACK, feats_r, feats_f, "frames", {})
    if real_frames is None or fake_frames is None:
        raise McdmError(f"efid: backend {backend.label} needs real_frames and fake_frames beside the landmarks")
    real_fr, fake_fr = as_frames(real_frames, "real frames"), as_frames(fake_frames, "fake frames")
    if len(real_fr) != len(real_lm) or len(fake_fr) != len(fake_lm):
        raise McdmError("efid: frames and landmarks differ in number")
    feats_r = np.full((len(real_lm), 64), np.nan)
    feats_f = np.full((len(fake_lm), 64), np.nan)
    if ok_r.any():
        feats_r[ok_r] = backend(real_fr[ok_r], real_lm[ok_r])
    if ok_f.any():
        feats_f[ok_f] = backend(fake_fr[ok_f], fake_lm[ok_f])
    return _frechet_result("efid", backend.label, feats_r, feats_f, "frames", {})


# ---------------------------------------------------------------------------------------------
# identity (beyond the paper): dlib-descriptor distance of every frame to the reference

IDENTITY_BACKEND = "dlib-descriptor-128"


def identity_curve(ref_image, frames, faces: DlibFrameFeatures | None = None, metric: str = "distance") -> np.ndarray:
    """Per-frame identity score against the reference portrait, NaN where no face was found.

    ``metric="distance"``: Euclidean distance of dlib descriptors (same person < ~0.6, dlib's
    threshold); ``"cosine"``: cosine similarity of the descriptors.
    """
    faces = faces or DlibFrameFeatures()
    ref = faces.descriptors(as_frames(ref_image, "reference image"))[0]
    if not np.isfinite(ref).all():
        raise McdmError("identity: no face found in the reference image")
    desc = faces.descriptors(as_frames(frames, "frames"), desc="identity")
    if metric == "distance":
        return np.linalg.norm(desc - ref, axis=1)
    if metric == "cosine":
        return desc @ ref / (np.linalg.norm(desc, axis=1) * np.linalg.norm(ref))
    raise McdmError(f"identity: unknown metric {metric!r} (distance or cosine)")


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else float("nan")


def curve_drift(curve: np.ndarray, tail: float = 0.1) -> float:
    """Mean of the last ``tail`` fraction of the frames minus the mean of the first (>= 1 frame each)."""
    curve = np.asarray(curve, np.float64)
    k = max(1, int(round(tail * len(curve))))
    return _nanmean(curve[-k:]) - _nanmean(curve[:k])


def identity_summary(curves, gt_curves=None, tail: float = 0.1) -> dict:
    """Mean identity distance, drift and frames without a face over one curve or a list of curves,
    beside ground truth's own distance to the reference when ``gt_curves`` are given.

    ``identity`` pools all frames; ``identity_drift`` is the mean over videos of each video's drift.
    """
    def one(cs, prefix):
        cs = [np.asarray(c, np.float64) for c in ([cs] if np.ndim(cs[0]) == 0 else cs)] if len(cs) else []
        if not cs or not sum(len(c) for c in cs):
            raise McdmError("identity: no frames to summarise")
        pooled = np.concatenate(cs)
        drifts = np.array([curve_drift(c, tail) for c in cs])
        return {
            prefix: _nanmean(pooled),
            f"{prefix}_drift": _nanmean(drifts),
            f"{prefix}_no_face_frames": int((~np.isfinite(pooled)).sum()),
            f"{prefix}_n": int(np.isfinite(pooled).sum()),
        }

    out = one(curves, "identity")
    if gt_curves is not None:
        out.update(one(gt_curves, "identity_gt"))
        out["identity_gap"] = out["identity"] - out["identity_gt"]
    out["identity_backend"] = IDENTITY_BACKEND
    return out


# ---------------------------------------------------------------------------------------------
# Sync-C / Sync-D: adapter to the SyncNet of the data stages (mcdm.models.sync)


def load_sync_model(path: str | Path):
    """A SyncNet (``save_pretrained`` folder or official ``syncnet_v2.model``) via ``mcdm.models.sync``."""
    return load_syncnet(path)


def sync_metrics(frames, audio, model, landmarks: np.ndarray | None = None, max_offset: int = 15) -> dict[str, MetricResult]:
    """Sync-C (confidence, higher better) and Sync-D (min distance, lower better) of one video.

    Calls ``mcdm.models.sync.scoring.sync_scores`` (the one SyncNet module shared with the ``sync_filter``
    stage, decisions.md #22) with 25 fps RGB frames, 16 kHz mono ``audio`` and optional ``(T, 68, 2)``
    landmarks (NaN frames are interpolated; all-NaN -> None, i.e. the lower-half mouth box).
    """
    if landmarks is not None:
        landmarks = fill_missing(landmarks)
        if not np.isfinite(landmarks).all():
            landmarks = None
    scores = sync_scores(as_frames(frames, "frames"), np.asarray(audio, np.float32), landmarks, model=model, max_offset=max_offset)
    backend, n = str(scores["sync_backend"]), int(scores["n_windows"])
    return {
        "sync_c": MetricResult("sync_c", float(scores["sync_conf"]), backend, n),
        "sync_d": MetricResult("sync_d", float(scores["sync_dist"]), backend, n),
        "av_offset": MetricResult("av_offset", float(scores["av_offset"]), backend, n),
    }


# ---------------------------------------------------------------------------------------------
# the suite: backends chosen from EvalParams, one flat dict out


class MetricSuite:
    """All metrics of one evaluation run with the backends ``EvalParams`` selects.

        suite = MetricSuite(params.eval, syncnet="models/syncnet")
        row = suite.evaluate(real_videos, fake_videos, refs, audios)   # {"fid": ..., "fid_backend": ...}
        base = suite.baselines(real_videos, refs, audios)              # static reference, GT vs itself

    ``inception_path`` / ``i3d_path`` / ``deep3d_path`` switch FID / FVD / E-FID to the paper's
    networks; otherwise the labelled dlib fallbacks run. FID, E-FID and identity use every
    ``frame_stride``-th frame; FVD and SSIM use every frame. ``fps``: the videos' frame rate
    (``data.fps``), the time unit of the FVD fallback's motion features; ``sync_max_offset``:
    ``data.syncnet.max_offset``; ``syncnet``: a SyncNet or its path. One ``DlibFrameFeatures``
    cache is shared by every metric and every call, so each distinct frame is analysed once per run.
    """

    def __init__(self, params: EvalParams, device: torch.device | str | None = None, syncnet=None,
                 faces: DlibFrameFeatures | None = None, fps: float = 25.0, sync_max_offset: int = 15):
        self.params = params
        self.sync_max_offset = sync_max_offset
        self.faces = faces or DlibFrameFeatures(min_side=params.dlib_min_side)
        self.fid_backend = (
            InceptionFeatures(params.inception_path, device) if params.inception_path
            else DlibDescriptorFeatures(self.faces)
        )
        self.fvd_backend = (
            I3DFeatures(params.i3d_path, device) if params.i3d_path
            else DynamicsVideoFeatures(self.faces, descriptor_every=params.fvd_fallback_descriptor_every, fps=fps)
        )
        self.efid_backend = Deep3DExpression(params.deep3d_path, device) if params.deep3d_path else None
        self.syncnet = load_sync_model(syncnet) if isinstance(syncnet, (str, Path)) else syncnet

    @property
    def backends(self) -> dict[str, str]:
        return {
            "fid": self.fid_backend.label,
            "fvd": self.fvd_backend.label,
            "efid": self.efid_backend.label if self.efid_backend else EFID_FALLBACK,
            "ssim": SSIM_BACKEND,
            "identity": IDENTITY_BACKEND,
        }

    def evaluate(self, real_videos, fake_videos, refs=None, audios=None) -> dict:
        """Every metric of generated vs ground-truth videos (paired by index).

        ``refs``: the reference portrait of each video (identity metrics); ``audios``: 16 kHz mono
        audio of each video (Sync-C/D, needs ``syncnet``). Missing inputs skip those metrics.
        """
        real, fake = as_videos(real_videos, "real videos"), as_videos(fake_videos, "fake videos")
        if len(real) != len(fake):
            raise McdmError(f"evaluate: {len(real)} real videos but {len(fake)} generated")
        stride = self.params.frame_stride
        real_frames = np.concatenate([v[::stride] for v in real])
        fake_frames = np.concatenate([v[::stride] for v in fake])
        out: dict = {}
        out.update(fid(real_frames, fake_frames, self.fid_backend).flat())
        out.update(fvd(real, fake, self.fvd_backend, clip_frames=self.params.fvd_clip_frames).flat())
        out.update(ssim_metric(real, fake).flat())
        real_lm, fake_lm = self.faces.landmarks(real_frames), self.faces.landmarks(fake_frames)
        out.update(efid(real_lm, fake_lm, self.efid_backend, real_frames=real_frames, fake_frames=fake_frames).flat())
        if refs is not None:
            refs = as_frames(refs, "reference images")
            if len(refs) != len(fake):
                raise McdmError(f"evaluate: {len(refs)} reference images for {len(fake)} videos")
            curves = [identity_curve(r, v[::stride], self.faces) for r, v in zip(refs, fake)]
            gt = [identity_curve(r, v[::stride], self.faces) for r, v in zip(refs, real)]
            out.update(identity_summary(curves, gt, self.params.drift_tail))
        if audios is not None:
            out.update(self.sync(fake, audios))
        return out

    def sync(self, videos, audios) -> dict:
        """Mean Sync-C / Sync-D / |AV offset| over videos (flat dict with backend and window count)."""
        if self.syncnet is None:
            raise McdmError("evaluate: Sync-C/D need a SyncNet (MetricSuite(..., syncnet=path or model))")
        videos = as_videos(videos, "videos")
        if len(audios) != len(videos):
            raise McdmError(f"evaluate: {len(audios)} audio tracks for {len(videos)} videos")
        per_video = [sync_metrics(v, a, self.syncnet, self.faces.landmarks(v), self.sync_max_offset)
                     for v, a in zip(videos, audios)]
        out = {}
        for name in ("sync_c", "sync_d"):
            values = np.array([r[name].value for r in per_video])
            out.update(MetricResult(name, float(values.mean()), per_video[0][name].backend,
                                    sum(r[name].n for r in per_video)).flat())
        out["av_offset_abs"] = float(np.mean([abs(r["av_offset"].value) for r in per_video]))
        return out

    def baselines(self, real_videos, refs, audios=None) -> dict[str, dict]:
        """Trivial rows computed in the same run with the same backends:

        - ``static_reference``: each video replaced by its reference frame repeated (no motion);
          identity 0 by construction, a bound rather than a target (decisions.md #20);
        - ``ground_truth``: ground truth against itself (sanity: SSIM 1, FID / FVD / E-FID 0).
        """
        real = as_videos(real_videos, "real videos")
        refs = as_frames(refs, "reference images")
        static = [np.repeat(r[None], len(v), axis=0) for r, v in zip(refs, real)]
        return {
            "static_reference": self.evaluate(real, static, refs, audios),
            "ground_truth": self.evaluate(real, real, refs, audios),
        }
