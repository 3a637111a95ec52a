"""The metrics of a set of generated videos against their ground truth, each guarded (a metric that
cannot be computed is recorded as null with its reason), with a per-clip breakdown, the feature rows
behind the Fréchet metrics (for the bootstrap over clips), and the checks of the model against the
trivial baselines (decisions.md #20)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from mcdm.config import Params
from mcdm.data.parallel import stage_workers
from mcdm.errors import McdmError
from mcdm.eval import metrics as M
from mcdm.eval.failures import penalised_identity
from mcdm.eval.lip_motion import BACKEND as MOUTH_BACKEND
from mcdm.eval.lip_motion import mouth_correlation
from mcdm.eval.sharpness import PSNR_BACKEND, SHARPNESS_BACKEND, psnr_metric, sharpness_ratio
from mcdm.eval.suite import MetricSuite

IDENTITY_TOLERANCE = 0.05  # decisions.md #20: the full model's mean identity distance within this of ground truth's
FRECHET = ("fid", "fvd", "efid")


def guard(name: str, backend: str, compute):
    """One metric; a metric that cannot be computed becomes ``{name: None, name_error: reason}``."""
    try:
        return compute()
    except McdmError as err:
        return {name: None, f"{name}_backend": backend, f"{name}_error": str(err)}


def guard_flat(name: str, backend: str, compute) -> dict:
    """``guard`` as a flat dict (a ``MetricResult``'s ``flat()``)."""
    result = guard(name, backend, compute)
    return result.flat() if isinstance(result, M.MetricResult) else result


def _value(compute) -> Optional[float]:
    """A ``MetricResult``'s value, None when it cannot be computed (a per-clip cell)."""
    try:
        return compute().value
    except McdmError:
        return None


def _nanmean(x) -> Optional[float]:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


def descriptor_frames(n: int, stride: int, clip_frames: int, descriptor_every: int) -> np.ndarray:
    """Which of a video's ``n`` frames the metrics take a face descriptor of: every ``stride``-th
    (FID, identity) and every ``descriptor_every``-th of each FVD clip (fallback backend)."""
    want = np.zeros(n, bool)
    want[::stride] = True
    for start in range(0, n - clip_frames + 1, clip_frames):
        want[start:start + clip_frames:descriptor_every] = True
    return want


def prefetch_faces(suite: MetricSuite, video_sets: list[list[np.ndarray]], params: Params) -> int:
    """Analyse every frame of ``video_sets`` that the metrics will (landmarks on all, descriptors per
    :func:`descriptor_frames`) in ``data.workers`` processes before the metrics run, when there are
    at least ``eval.parallel_faces_min_frames`` of them. Returns the number of frames analysed."""

    p = params.eval
    videos = [v for videos in video_sets for v in videos]
    if not videos:
        return 0
    frames = np.concatenate(videos)
    want = np.concatenate([descriptor_frames(len(v), p.frame_stride, p.fvd_clip_frames,
                                             p.fvd_fallback_descriptor_every) for v in videos])
    workers = stage_workers(params.data.workers, params.data.dask_address, multithreaded=False)
    return suite.faces.prefetch(frames, want, workers=workers, address=params.data.dask_address,
                                min_frames=p.parallel_faces_min_frames)


def video_metrics(suite: MetricSuite, real: list, fake: list, refs: np.ndarray,
                  audios: list) -> tuple[dict, list[dict], dict[str, dict]]:
    """``MetricSuite.evaluate``'s metrics, each guarded, plus a per-clip breakdown.

    Returns (pooled flat dict; one dict per clip: ssim, psnr, sharpness_ratio, identity (generated
    frames without a face charged, ``mcdm.eval.failures``), identity_gt, identity_drift,
    no_face_frames, face_frames, mouth_open_corr (``mcdm.eval.lip_motion``), sync_c, sync_d,
    av_offset; and per Fréchet metric its feature rows ``real``, ``fake`` with the
    video of each row ``real_video``, ``fake_video``).
    """
    backends = suite.backends
    out: dict = {}
    rows: dict[str, dict] = {}
    stride = suite.params.frame_stride
    owners = [np.repeat(np.arange(len(vs)), [len(v[::stride]) for v in vs]) for vs in (real, fake)]
    for name, compute in (("fid", lambda: suite.fid(real, fake)), ("fvd", lambda: suite.fvd(real, fake)),
                          ("efid", lambda: suite.efid(real, fake, refs))):
        result = guard(name, backends[name], compute)
        out.update(result.flat() if isinstance(result, M.MetricResult) else result)
        if isinstance(result, M.MetricResult) and result.rows is not None:
            rows[name] = {"real_video": owners[0], "fake_video": owners[1], **result.rows}
    out.update(guard_flat("ssim", backends["ssim"], lambda: M.ssim_metric(real, fake)))
    out.update(guard_flat("psnr", PSNR_BACKEND, lambda: psnr_metric(real, fake)))
    out.update(guard_flat("sharpness_ratio", SHARPNESS_BACKEND, lambda: sharpness_ratio(real, fake)))
    per_clip = [{"ssim": float(np.mean(M.ssim_curve(r, f))), "psnr": _value(lambda: psnr_metric([r], [f])),
                 "sharpness_ratio": _value(lambda: sharpness_ratio([r], [f]))} for r, f in zip(real, fake)]
    try:
        pooled, clips = mouth_correlation([suite.faces.landmarks(v) for v in real],
                                          [suite.faces.landmarks(v) for v in fake])
        out.update(pooled)
        for row, c in zip(per_clip, clips):
            row["mouth_open_corr"] = c["r"]
    except McdmError as err:
        out.update({"mouth_open_corr": None, "mouth_open_corr_backend": MOUTH_BACKEND, "mouth_open_corr_error": str(err)})
    try:
        curves, gt = suite.identity_curves(refs, fake), suite.identity_curves(refs, real)
        out.update(M.identity_summary(curves, gt, suite.params.drift_tail))
        for row, c, g in zip(per_clip, curves, gt):
            charged = penalised_identity(c)
            row.update(identity=float(charged.mean()), identity_gt=_nanmean(g),
                       identity_drift=M.curve_drift(charged, suite.params.drift_tail),
                       no_face_frames=int((~np.isfinite(c)).sum()), face_frames=int(len(c)))
    except McdmError as err:
        out.update({"identity": None, "identity_backend": backends["identity"], "identity_error": str(err)})
    if suite.syncnet is not None and audios is not None:
        results = [guard("sync_c", "syncnet", lambda v=v, a=a: suite.sync_one(v, a)) for v, a in zip(fake, audios)]
        ok = [r for r in results if isinstance(r["sync_c"], M.MetricResult)]
        for row, r in zip(per_clip, results):
            if isinstance(r["sync_c"], M.MetricResult):
                row.update(sync_c=r["sync_c"].value, sync_d=r["sync_d"].value, av_offset=abs(r["av_offset"].value))
        if ok:  # the pooled values as MetricSuite.sync computes them (mean over videos)
            for name in ("sync_c", "sync_d"):
                out.update({name: float(np.mean([r[name].value for r in ok])), f"{name}_backend": ok[0][name].backend,
                            f"{name}_n": int(sum(r[name].n for r in ok))})
            out["av_offset_abs"] = float(np.mean([abs(r["av_offset"].value) for r in ok]))
        else:
            out.update({"sync_c": None, "sync_d": None, "sync_c_error": results[0].get("sync_c_error", "no clip")})
    return out, per_clip, rows


def comparison_checks(full: dict, static: dict, autoencoder: Optional[dict] = None) -> dict:
    """decisions.md #20: beat the static reference on Sync-C and FVD; identity mean within 0.05 of ground
    truth's; and, beside it, within 0.05 of the autoencoder ceiling's (ground truth through the VAE).
    Point values only: ``mcdm.eval.claims`` answers the same questions with confidence intervals."""
    def beats(metric: str, higher: bool):
        a, b = full.get(metric), static.get(metric)
        if a is None or b is None:
            return None
        return bool(a > b) if higher else bool(a < b)

    def identity_within(other: Optional[float]):
        if full.get("identity") is None or other is None or not math.isfinite(other):
            return None
        return bool(abs(full["identity"] - other) <= IDENTITY_TOLERANCE)

    return {"sync_c_beats_static_reference": beats("sync_c", True),
            "fvd_beats_static_reference": beats("fvd", False),
            "identity_within_0.05_of_ground_truth": identity_within(full.get("identity_gt")),
            "identity_within_0.05_of_autoencoder": identity_within((autoencoder or {}).get("identity"))}
