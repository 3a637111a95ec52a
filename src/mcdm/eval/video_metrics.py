"""The metrics of a set of generated videos against their ground truth, each guarded (a metric that
cannot be computed is recorded as null with its reason), with a per-clip breakdown, and the checks
of the model against the trivial baselines (decisions.md #20)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from mcdm.config import Params
from mcdm.data.parallel import stage_workers
from mcdm.errors import McdmError
from mcdm.eval import metrics as M

IDENTITY_TOLERANCE = 0.05  # decisions.md #20: the full model's mean identity distance within this of ground truth's


def _guard(name: str, backend: str, compute) -> dict:
    """One metric; a metric that cannot be computed becomes ``{name: None, name_error: reason}``."""
    try:
        result = compute()
    except McdmError as err:
        return {name: None, f"{name}_backend": backend, f"{name}_error": str(err)}
    return result.flat() if isinstance(result, M.MetricResult) else result


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


def prefetch_faces(suite: M.MetricSuite, video_sets: list[list[np.ndarray]], params: Params) -> int:
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


def video_metrics(suite: M.MetricSuite, real: list, fake: list, refs: np.ndarray, audios: list) -> tuple[dict, list[dict]]:
    """``MetricSuite.evaluate``'s metrics, each guarded, plus a per-clip breakdown.

    Returns (pooled flat dict, one dict per clip: ssim, identity, identity_gt, identity_drift,
    no_face_frames, sync_c, sync_d, av_offset).
    """
    p = suite.params
    stride = p.frame_stride
    backends = suite.backends
    real_frames = np.concatenate([v[::stride] for v in real])
    fake_frames = np.concatenate([v[::stride] for v in fake])
    out: dict = {}
    out.update(_guard("fid", backends["fid"], lambda: M.fid(real_frames, fake_frames, suite.fid_backend)))
    out.update(_guard("fvd", backends["fvd"], lambda: M.fvd(real, fake, suite.fvd_backend, clip_frames=p.fvd_clip_frames)))
    out.update(_guard("ssim", backends["ssim"], lambda: M.ssim_metric(real, fake)))

    def efid():
        real_lm, fake_lm = suite.faces.landmarks(real_frames), suite.faces.landmarks(fake_frames)
        return M.efid(real_lm, fake_lm, suite.efid_backend, real_frames=real_frames, fake_frames=fake_frames)

    out.update(_guard("efid", backends["efid"], efid))
    per_clip = [{"ssim": float(np.mean(M.ssim_curve(r, f)))} for r, f in zip(real, fake)]
    try:
        curves = [M.identity_curve(ref, v[::stride], suite.faces) for ref, v in zip(refs, fake)]
        gt = [M.identity_curve(ref, v[::stride], suite.faces) for ref, v in zip(refs, real)]
        out.update(M.identity_summary(curves, gt, p.drift_tail))
        if not math.isfinite(out["identity"]):
            out["identity_error"] = f"identity: no face found in any of the {out['identity_no_face_frames']} frames"
        for row, c, g in zip(per_clip, curves, gt):
            row.update(identity=_nanmean(c), identity_gt=_nanmean(g), identity_drift=M.curve_drift(c, p.drift_tail),
                       no_face_frames=int((~np.isfinite(c)).sum()))
    except McdmError as err:
        out.update({"identity": None, "identity_backend": backends["identity"], "identity_error": str(err)})
    if suite.syncnet is not None and audios is not None:
        rows = [_guard("sync_c", "syncnet", lambda v=v, a=a: suite.sync([v], [a])) for v, a in zip(fake, audios)]
        for row, s in zip(per_clip, rows):
            row.update(sync_c=s.get("sync_c"), sync_d=s.get("sync_d"), av_offset=s.get("av_offset_abs"))
        ok = [s for s in rows if s.get("sync_c") is not None]
        if ok:  # the pooled values as MetricSuite.sync computes them (mean over videos)
            out.update({"sync_c": float(np.mean([s["sync_c"] for s in ok])), "sync_c_backend": ok[0]["sync_c_backend"],
                        "sync_c_n": int(sum(s["sync_c_n"] for s in ok)),
                        "sync_d": float(np.mean([s["sync_d"] for s in ok])), "sync_d_backend": ok[0]["sync_d_backend"],
                        "sync_d_n": int(sum(s["sync_d_n"] for s in ok)),
                        "av_offset_abs": float(np.mean([s["av_offset_abs"] for s in ok]))})
        else:
            out.update({"sync_c": None, "sync_d": None, "sync_c_error": rows[0].get("sync_c_error", "no clip")})
    return out, per_clip


def comparison_checks(full: dict, static: dict, autoencoder: Optional[dict] = None) -> dict:
    """decisions.md #20: beat the static reference on Sync-C and FVD; identity mean within 0.05 of ground
    truth's; and, beside it, within 0.05 of the autoencoder ceiling's (ground truth through the VAE)."""
    def beats(metric: str, higher: bool):
        a, b = full.get(metric), static.get(metric)
        if a is None or b is None:
            return None
        return bool(a > b) if higher else bool(a < b)

    def identity_within(other: Optional[float]):
        if full.get("identity") is None or other is None:
            return None
        return bool(abs(full["identity"] - other) <= IDENTITY_TOLERANCE)

    return {"sync_c_beats_static_reference": beats("sync_c", True),
            "fvd_beats_static_reference": beats("fvd", False),
            "identity_within_0.05_of_ground_truth": identity_within(full.get("identity_gt")),
            "identity_within_0.05_of_autoencoder": identity_within((autoencoder or {}).get("identity"))}
