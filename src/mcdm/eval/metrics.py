"""The evaluation metrics of MCDM (paper Sec. 4: FID, FVD, Sync-C/D, SSIM, E-FID) plus identity drift.

Every metric returns a ``MetricResult`` whose ``backend`` names what produced the number (the
paper's network given by local path, or a labelled fallback; see ``mcdm.eval.detectors`` and ``mcdm.eval.landmark_features``), and
``mcdm.eval.suite.MetricSuite`` turns ``EvalParams`` into one flat ``{metric: value, metric + "_backend":
label}`` dict for metrics.json / MLflow / the report. Generated frames without a face count against
the model (``mcdm.eval.failures``).

Inputs: frames are RGB uint8 ``(N, H, W, 3)``; videos are sequences of ``(T, H, W, 3)`` (numpy or
torch, channel-last).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from mcdm.errors import McdmError
from mcdm.eval.detectors import Deep3DExpression, I3DFeatures, InceptionFeatures, as_frames, as_videos, split_clips
from mcdm.eval.face_features import DlibDescriptorFeatures, DlibFrameFeatures
from mcdm.eval.failures import finite_rows, penalised_features, penalised_identity
from mcdm.eval.frechet import frechet_from_features
from mcdm.eval.landmark_features import (
    DynamicsVideoFeatures,
    clip_dynamics_parts,
    fill_missing,
    landmark_expression_features,
)
from mcdm.eval.statistics import failure_rate
from mcdm.models.sync.scoring import sync_scores
from mcdm.models.sync.syncnet import load_syncnet


@dataclass
class MetricResult:
    name: str
    value: float
    backend: str
    n: int  # samples behind the value (frames, clips, windows)
    details: dict = field(default_factory=dict)  # counts worth reporting (e.g. frames without a face)
    # the feature rows behind a Fréchet distance (``real``, ``fake``: NaN rows where no face was found),
    # kept for the bootstrap over clips (mcdm.eval.claims); not part of ``flat``
    rows: dict | None = None

    def flat(self) -> dict:
        out = {self.name: self.value, f"{self.name}_backend": self.backend, f"{self.name}_n": self.n}
        out.update({f"{self.name}_{k}": v for k, v in self.details.items()})
        return out


def _frechet_result(name: str, backend: str, real: np.ndarray, fake: np.ndarray, unit: str, details: dict) -> MetricResult:
    """Fréchet distance of two feature sets: real rows without a face are dropped and counted (the
    data's), fake rows without a face are charged as the no-face point (the model's failures,
    ``mcdm.eval.failures``) and their rate reported beside the value."""
    if len(fake) < 2:
        raise McdmError(f"{name}: need at least 2 generated {unit} (got {len(fake)})")
    n_real = int(finite_rows(real).sum()) if len(real) else 0
    if n_real < 2:
        raise McdmError(f"{name}: need at least 2 real {unit} with a face (got {n_real} of {len(real)}): the ground "
                        "truth, not the model, lacks faces")
    real_ok, fake_pen, failed = penalised_features(real, fake)
    details = {**details, f"no_face_{unit}_real": int(len(real) - n_real), f"no_face_{unit}_fake": int(failed.sum())}
    rate = failure_rate(failed)
    details.update(failure_rate=rate.value, failure_rate_low=rate.low, failure_rate_high=rate.high)
    value = frechet_from_features(real_ok, fake_pen)
    return MetricResult(name, value, backend, int(len(fake)), details, rows={"real": real, "fake": fake})


# ---------------------------------------------------------------------------------------------
# SSIM (Wang, Bovik, Sheikh & Simoncelli 2004)

SSIM_BACKEND = "ssim-wang2004:gaussian11-sigma1.5-per-channel"


def ssim(a, b, data_range: float, channel_axis: int | None = -1, k1: float = 0.01, k2: float = 0.03,
         sigma: float = 1.5) -> float | np.ndarray:
    """Mean SSIM of ``a`` vs ``b`` per image: scikit-image's ``structural_similarity`` with Wang et
    al. (2004)'s settings (Gaussian window, sigma 1.5, population covariance), in float64.

    Layout: ``(H, W, C)`` or ``(N, H, W, C)`` with ``channel_axis=-1``; ``(H, W)`` or ``(N, H, W)``
    with ``channel_axis=None`` (numpy or torch). Colour images: SSIM per channel, then the mean
    over channels. Returns a float for one image, an ``(N,)`` array for a batch.
    """
    x = a.detach().cpu().to(torch.float64).numpy() if isinstance(a, torch.Tensor) else np.array(a, np.float64)
    y = b.detach().cpu().to(torch.float64).numpy() if isinstance(b, torch.Tensor) else np.array(b, np.float64)
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
    if channel_axis is not None:
        x, y = np.moveaxis(x, channel_axis, -1), np.moveaxis(y, channel_axis, -1)  # (N, H, W, C)
    h, w = x.shape[1:3]
    window = 2 * int(3.5 * sigma + 0.5) + 1  # scikit-image's Gaussian window
    if min(h, w) < window:
        raise McdmError(f"ssim: images must be at least {window} px on each side; got {h}x{w}")
    axis = None if channel_axis is None else -1
    per_image = np.array([structural_similarity(p, q, gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
                                                data_range=data_range, channel_axis=axis, K1=k1, K2=k2)
                          for p, q in zip(x, y)], np.float64)
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
    ``fvd-fallback:dlib-descriptor+landmark-dynamics`` features, whose generated clips without
    enough face are charged as failures (``mcdm.eval.failures``). ``rows`` also holds the video of
    each clip (``real_video``, ``fake_video``).
    """
    if isinstance(backend, (str, Path)):
        backend = I3DFeatures(backend)
    backend = backend or DynamicsVideoFeatures(faces)
    real, fake = as_videos(real_videos, "real videos"), as_videos(fake_videos, "fake videos")
    real_clips, where_r, short_r = split_clips(real, clip_frames)
    fake_clips, where_f, short_f = split_clips(fake, clip_frames)
    details = {"short_videos_real": short_r, "short_videos_fake": short_f}
    if len(real_clips) < 2 or len(fake_clips) < 2:
        raise McdmError(f"fvd: need at least 2 clips of {clip_frames} frames per set "
                        f"(real {len(real_clips)}, fake {len(fake_clips)}; {short_r} / {short_f} videos too short)")
    real_f, fake_f = backend(real_clips), backend(fake_clips)
    result = _frechet_result("fvd", backend.label, real_f, fake_f, "clips", details)
    result.rows.update(real_video=np.array([w[0] for w in where_r]), fake_video=np.array([w[0] for w in where_f]))
    if isinstance(backend, DynamicsVideoFeatures):
        # the same distance on each part of the feature vector (not additive: the parts correlate)
        real_ok, fake_pen, _ = penalised_features(real_f, fake_f)
        for part, cols in clip_dynamics_parts(clip_frames).items():
            result.details[f"part_{part}"] = frechet_from_features(real_ok[:, cols], fake_pen[:, cols])
    return result


EFID_FALLBACK = "landmark-expression-offsets"


def efid(real_landmarks, fake_landmarks, backend: Deep3DExpression | str | Path | None = None, *,
         real_neutral=None, fake_neutral=None, real_frames=None, fake_frames=None) -> MetricResult:
    """E-FID: Fréchet distance of expression features.

    Fallback (``backend=None``): ``landmark-expression-offsets`` of ``(N, 68, 2)`` landmarks, each frame
    relative to its identity's neutral shape: ``real_neutral`` / ``fake_neutral``, (68, 2) or (N, 68, 2)
    (the landmarks of the reference portrait of each frame's clip; a frame without one has no
    offsets, so give one for every frame). With a ``Deep3DExpression`` (or its path), the 64
    Deep3DFaceRecon expression coefficients of ``real_frames`` / ``fake_frames``, cropped around the
    landmarks. Real frames without landmarks are dropped and counted; generated ones are charged as
    failures (``mcdm.eval.failures``).
    """
    real_lm, fake_lm = np.asarray(real_landmarks, np.float64), np.asarray(fake_landmarks, np.float64)
    for what, lm in (("real", real_lm), ("fake", fake_lm)):
        if lm.ndim != 3 or lm.shape[1:] != (68, 2):
            raise McdmError(f"efid: {what} landmarks must be (N, 68, 2); got {lm.shape}")
    ok_r, ok_f = finite_rows(real_lm), finite_rows(fake_lm)
    if isinstance(backend, (str, Path)):
        backend = Deep3DExpression(backend)
    if backend is None:
        if real_neutral is None or fake_neutral is None:
            raise McdmError("efid: the landmark fallback measures expression against each identity's neutral shape: "
                            "give real_neutral and fake_neutral (the reference portrait's landmarks of each frame)")
        neutral_r = np.broadcast_to(np.asarray(real_neutral, np.float64), real_lm.shape)
        neutral_f = np.broadcast_to(np.asarray(fake_neutral, np.float64), fake_lm.shape)
        ok_r, ok_f = ok_r & finite_rows(neutral_r), ok_f & finite_rows(neutral_f)
        feats_r = np.full((len(real_lm), 84), np.nan)
        feats_f = np.full((len(fake_lm), 84), np.nan)
        if ok_r.any():
            feats_r[ok_r] = landmark_expression_features(real_lm[ok_r], neutral_r[ok_r])
        if ok_f.any():
            feats_f[ok_f] = landmark_expression_features(fake_lm[ok_f], neutral_f[ok_f])
        details = {}
        return _frechet_result("efid", EFID_FALLBACK, feats_r, feats_f, "frames", details)
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

    A generated frame without a face is charged ``IDENTITY_FAILURE_DISTANCE`` (``mcdm.eval.failures``)
    and counted (``identity_no_face_frames``, ``identity_failure_rate`` with its Wilson interval); a
    ground-truth frame without one is left out (the data's). ``identity`` pools all frames;
    ``identity_drift`` is the mean over videos of each video's drift.
    """
    def one(cs, prefix, charge):
        cs = [np.asarray(c, np.float64) for c in ([cs] if np.ndim(cs[0]) == 0 else cs)] if len(cs) else []
        if not cs or not sum(len(c) for c in cs):
            raise McdmError("identity: no frames to summarise")
        pooled = np.concatenate(cs)
        lost = ~np.isfinite(pooled)
        values = [penalised_identity(c) for c in cs] if charge else cs
        out = {
            prefix: _nanmean(np.concatenate(values)),
            f"{prefix}_drift": _nanmean(np.array([curve_drift(c, tail) for c in values])),
            f"{prefix}_no_face_frames": int(lost.sum()),
            f"{prefix}_n": int(len(pooled) if charge else (~lost).sum()),
        }
        if charge:
            rate = failure_rate(lost)
            out.update({f"{prefix}_failure_rate": rate.value, f"{prefix}_failure_rate_low": rate.low,
                        f"{prefix}_failure_rate_high": rate.high})
        return out

    out = one(curves, "identity", charge=True)
    if gt_curves is not None:
        out.update(one(gt_curves, "identity_gt", charge=False))
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
