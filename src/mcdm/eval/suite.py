"""The metrics of one evaluation run with the backends ``EvalParams`` selects (``mcdm.eval.metrics``
holds the metrics themselves)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mcdm.config import EvalParams
from mcdm.errors import McdmError
from mcdm.eval import metrics as M
from mcdm.eval.detectors import Deep3DExpression, I3DFeatures, InceptionFeatures, as_frames, as_videos
from mcdm.eval.face_features import DlibDescriptorFeatures, DlibFrameFeatures
from mcdm.eval.landmark_features import DynamicsVideoFeatures, expression_template


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
        self.syncnet = M.load_sync_model(syncnet) if isinstance(syncnet, (str, Path)) else syncnet

    @property
    def backends(self) -> dict[str, str]:
        return {
            "fid": self.fid_backend.label,
            "fvd": self.fvd_backend.label,
            "efid": self.efid_backend.label if self.efid_backend else M.EFID_FALLBACK,
            "ssim": M.SSIM_BACKEND,
            "identity": M.IDENTITY_BACKEND,
        }

    # ------------------------------------------------------------------------------------ one metric each
    def strided(self, videos) -> np.ndarray:
        """Every ``frame_stride``-th frame of each video, concatenated (FID, E-FID and identity's frames)."""
        return np.concatenate([v[:: self.params.frame_stride] for v in videos])

    def fid(self, real, fake) -> M.MetricResult:
        return M.fid(self.strided(real), self.strided(fake), self.fid_backend)

    def fvd(self, real, fake) -> M.MetricResult:
        return M.fvd(real, fake, self.fvd_backend, clip_frames=self.params.fvd_clip_frames)

    def neutral_shapes(self, refs, real) -> np.ndarray:
        """(V, 68, 2): each video's identity neutral shape for the E-FID fallback: the landmarks of its
        reference portrait, else (no face found there) the Procrustes mean shape of its ground-truth
        frames; NaN when neither has a face."""
        out = self.faces.landmarks(as_frames(refs, "reference images"))
        for i in np.flatnonzero(~np.isfinite(out).all(axis=(1, 2))):
            try:
                out[i] = expression_template(self.faces.landmarks(real[i][:: self.params.frame_stride]))
            except McdmError:
                pass
        return out

    def efid(self, real, fake, refs) -> M.MetricResult:
        """E-FID of the strided frames, each against its video's identity neutral (``neutral_shapes``)."""
        real_frames, fake_frames = self.strided(real), self.strided(fake)
        real_lm, fake_lm = self.faces.landmarks(real_frames), self.faces.landmarks(fake_frames)
        neutral = self.neutral_shapes(refs, real)
        counts_r = [len(v[:: self.params.frame_stride]) for v in real]
        counts_f = [len(v[:: self.params.frame_stride]) for v in fake]
        return M.efid(real_lm, fake_lm, self.efid_backend, real_neutral=np.repeat(neutral, counts_r, axis=0),
                      fake_neutral=np.repeat(neutral, counts_f, axis=0), real_frames=real_frames,
                      fake_frames=fake_frames)

    def identity_curves(self, refs, videos) -> list[np.ndarray]:
        """Per video, the identity distance of its strided frames to its reference (NaN: no face)."""
        return [M.identity_curve(r, v[:: self.params.frame_stride], self.faces) for r, v in zip(refs, videos)]

    def sync_one(self, video, audio, landmarks=None) -> dict[str, M.MetricResult]:
        """Sync-C / Sync-D / offset of one video; ``landmarks`` default: dlib's on every frame."""
        if self.syncnet is None:
            raise McdmError("evaluate: Sync-C/D need a SyncNet (MetricSuite(..., syncnet=path or model))")
        lm = self.faces.landmarks(video) if landmarks is None else landmarks
        return M.sync_metrics(video, audio, self.syncnet, lm, self.sync_max_offset)

    # ------------------------------------------------------------------------------------ all of them
    def evaluate(self, real_videos, fake_videos, refs=None, audios=None) -> dict:
        """Every metric of generated vs ground-truth videos (paired by index).

        ``refs``: the reference portrait of each video (identity metrics, E-FID's neutral shapes;
        default: each ground-truth video's first frame); ``audios``: 16 kHz mono audio of each video
        (Sync-C/D, needs ``syncnet``). Without audio, Sync-C/D are skipped.
        """
        real, fake = as_videos(real_videos, "real videos"), as_videos(fake_videos, "fake videos")
        if len(real) != len(fake):
            raise McdmError(f"evaluate: {len(real)} real videos but {len(fake)} generated")
        refs = np.stack([v[0] for v in real]) if refs is None else as_frames(refs, "reference images")
        if len(refs) != len(fake):
            raise McdmError(f"evaluate: {len(refs)} reference images for {len(fake)} videos")
        out: dict = {}
        out.update(self.fid(real, fake).flat())
        out.update(self.fvd(real, fake).flat())
        out.update(M.ssim_metric(real, fake).flat())
        out.update(self.efid(real, fake, refs).flat())
        out.update(M.identity_summary(self.identity_curves(refs, fake), self.identity_curves(refs, real),
                                      self.params.drift_tail))
        if audios is not None:
            out.update(self.sync(fake, audios))
        return out

    def sync(self, videos, audios) -> dict:
        """Mean Sync-C / Sync-D / |AV offset| over videos (flat dict with backend and window count)."""
        videos = as_videos(videos, "videos")
        if len(audios) != len(videos):
            raise McdmError(f"evaluate: {len(audios)} audio tracks for {len(videos)} videos")
        per_video = [self.sync_one(v, a) for v, a in zip(videos, audios)]
        out = {}
        for name in ("sync_c", "sync_d"):
            values = np.array([r[name].value for r in per_video])
            out.update(M.MetricResult(name, float(values.mean()), per_video[0][name].backend,
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
