"""evaluate: generate the test clips with the trained pipeline and measure them (paper Sec. 4, Fig. 5).

1. Test set. Up to ``eval.max_test_clips`` test clips of ``data/features`` (regular clips first, then
   the long ones), each generated for at most ``eval.clip_seconds`` from ITS reference frame (frame 0,
   the frame the identity embedding of training came from) and ITS audio, in batches of
   ``eval.batch_size`` (optionally driven by the ground truth's landmarks, ``eval.use_landmarks``).
2. Metrics (``MetricSuite`` backends: FID, FVD, SSIM, E-FID, identity, Sync-C/D), each one computed on
   its own so that one that cannot be computed (e.g. no face found in generated frames) is recorded
   as null with its reason instead of stopping the stage. In the same run, with the same backends,
   the trivial baselines: ``static_reference`` (the reference frame repeated: identity 0 by
   construction, a bound, DECISIONS #20), ``ground_truth`` (ground truth vs itself: SSIM 1) and
   ``autoencoder`` (ground truth through the frozen VAE and back: what a denoiser that reproduced the
   ground truth's latents exactly would score, since every generated frame is a VAE decode; on the
   embedded default's 64 px tiny VAE it is what keeps identity far from ground truth's).
   ``checks`` states, true or false, whether the model beats the static reference on Sync-C and FVD
   and whether its identity distance is within 0.05 of ground truth's (DECISIONS #20) and of the
   autoencoder's. Ablation and sweep members
   (``baselines=False``) skip the baselines: they do not depend on the model, so the main line's
   ``evaluate`` measures them once for the report.
3. Long-term curve (Figure 5, DECISIONS #11): on the ``long_term``-flagged test clip(s), generate up to
   ``eval.long_term_seconds`` and record SSIM against ground truth and the identity distance to the
   reference (generated and ground truth) over the frame index, streaming (constant memory).
   ``long_term_curve`` takes any pipeline and writes its own CSV, so the ablation matrix reuses it
   per variant (``plot_long_term`` draws several curves in one figure).

Outputs: ``<out>/metrics.json`` (flat ``metric``, ``metric_backend``, ... plus ``baselines``,
``long_term``, ``checks``), ``<out>/eval_clips.csv`` (per clip), ``<out>/eval_grid.png`` (reference |
ground truth and generated at several times), ``<out>/long_term.csv`` (``frame, ssim, identity,
identity_gt``) + ``<out>/long_term.png``, and ``<samples>/*.mp4`` (generated clips with their audio).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mcdm.config import Params
from mcdm.errors import McdmError, MissingStageOutput
from mcdm.eval import metrics as M

STAGE = "evaluate"
IDENTITY_TOLERANCE = 0.05  # DECISIONS #20: the full model's mean identity distance within this of ground truth's


# ---------------------------------------------------------------------------------------------- data
def read_index(features_dir: str | Path) -> pd.DataFrame:
    path = Path(features_dir) / "index.parquet"
    if not path.is_file():
        raise MissingStageOutput(path, "features")
    index = pd.read_parquet(path)
    missing = [c for c in ("clip_id", "split", "n_frames") if c not in index]
    if missing:
        raise McdmError(f"{path}: lacks columns {', '.join(missing)}")
    if "long_term" not in index:
        index["long_term"] = False
    index["long_term"] = index["long_term"].fillna(False).astype(bool)
    index["file"] = [_feature_file(features_dir, row) for row in index.to_dict("records")]
    return index


def _feature_file(features_dir: str | Path, row: dict) -> str:
    own = Path(features_dir) / f"{row['clip_id']}.safetensors"
    if own.is_file() or not row.get("path"):
        return str(own)
    return str(row["path"])


def select_test_clips(index: pd.DataFrame, max_clips: int) -> pd.DataFrame:
    """Test clips in a fixed order: regular clips by id, then the long ones; at most ``max_clips``."""
    test = index[index["split"] == "test"]
    if test.empty:
        raise McdmError("features: the test split holds no clip (see data/split/test.parquet)")
    return test.sort_values(["long_term", "clip_id"]).head(max_clips).reset_index(drop=True)


class ClipFeatures:
    """Lazy reader of one clip's feature file: frames are sliced from disk, never all loaded at once."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingStageOutput(path, "features")
        self.path = path
        self._file = safe_open(str(path), framework="pt")
        keys = set(self._file.keys())
        missing = {"frames", "waveform", "landmarks"} - keys
        if missing:
            raise McdmError(f"{path}: lacks {', '.join(sorted(missing))}")
        self.n_frames = int(self._file.get_slice("frames").get_shape()[0])

    def frames(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """(n, S, S, 3) uint8 ground-truth crops."""
        stop = self.n_frames if stop is None else min(stop, self.n_frames)
        chunk = self._file.get_slice("frames")[start:stop]
        return np.ascontiguousarray(chunk.permute(0, 2, 3, 1).numpy())

    def landmarks(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        return self._file.get_slice("landmarks")[start:stop].numpy().astype(np.float32)

    def waveform(self, n_frames: int, fps: float, rate: int) -> np.ndarray:
        """The audio of the first ``n_frames`` frames (16 kHz mono), padded with silence if short."""
        n = int(round(n_frames / fps * rate))
        wave = self._file.get_slice("waveform")[:n].numpy().astype(np.float32)
        return np.pad(wave, (0, max(0, n - len(wave))))


# ---------------------------------------------------------------------------------------------- metrics
def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


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
    from mcdm.data.parallel import stage_workers

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
    """DECISIONS #20: beat the static reference on Sync-C and FVD; identity mean within 0.05 of ground
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


# ---------------------------------------------------------------------------------------------- pictures
def _atomic_savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def frame_grid(refs: np.ndarray, reals: list, fakes: list, clip_ids: list, fps: float, times: int, path: Path) -> Path:
    """Rows = clips; columns = reference | (ground truth, generated) at ``times`` instants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(refs), 1 + 2 * times
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.45 * rows), squeeze=False)
    for r in range(rows):
        n = min(len(reals[r]), len(fakes[r]))
        picks = np.linspace(0, n - 1, times).round().astype(int)
        cells = [(refs[r], "reference")]
        for i in picks:
            cells += [(reals[r][i], f"GT {i / fps:.1f}s"), (fakes[r][i], f"gen {i / fps:.1f}s")]
        for c, (img, title) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(img)
            ax.set_title(title, fontsize=6)
            ax.axis("off")
        # the clip's id beside its row (a title line above would run into the row above)
        axes[r, 0].text(-0.06, 0.5, clip_ids[r], rotation=90, transform=axes[r, 0].transAxes, ha="right",
                        va="center", fontsize=6)
    fig.tight_layout(pad=0.3)
    _atomic_savefig(fig, path)
    return path


def plot_long_term(curves: dict[str, pd.DataFrame], path: str | Path, title: str = "long-term generation") -> Path:
    """SSIM and identity distance against the frame index, one line per labelled curve (e.g. full, wo_fa)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_i) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, df in curves.items():
        ax_s.plot(df["frame"], df["ssim"], label=label)
        line = ax_i.plot(df["frame"], df["identity"], label=f"{label}: generated")[0]
        if "identity_gt" in df and len(curves) == 1:
            ax_i.plot(df["frame"], df["identity_gt"], color=line.get_color(), linestyle=":", label="ground truth")
    ax_i.axhline(0.0, color="grey", linestyle="--", linewidth=0.8, label="static reference (0, a bound)")
    ax_s.set(xlabel="frame", ylabel="SSIM vs ground truth", title="SSIM")
    ax_i.set(xlabel="frame", ylabel="dlib descriptor distance to reference", title="identity (lower is closer)")
    for ax in (ax_s, ax_i):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _atomic_savefig(fig, Path(path))
    return Path(path)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- long term
def long_term_curve(pipe, features_dir: str | Path, csv_path: str | Path, params: Params,
                    png_path: Optional[str | Path] = None, video_dir: Optional[str | Path] = None,
                    faces=None, label: Optional[str] = None, progress: bool = True) -> dict:
    """Figure 5: SSIM and identity over the frame index of a long generated sequence.

    ``pipe``: an ``MCDMPipeline`` (any variant) or a models folder. On the first
    ``eval.long_term_clips`` long-term test clips (else the longest test clip, labelled), generates
    ``min(eval.long_term_seconds, clip length)`` from the clip's reference frame and audio, clip by
    clip; every ``eval.long_term_every`` frames one CSV row: ``frame, ssim`` (mean SSIM over those
    frames), ``identity`` and ``identity_gt`` (dlib-descriptor distance of the generated and of the
    ground-truth frame to the reference; NaN without a face). Several clips are averaged per row.
    Writes ``csv_path`` (and ``png_path``, and ``video_dir/long_term_<clip>.mp4`` with its audio);
    returns a summary (means, first / last ``eval.drift_tail`` of the sequence, drifts).
    """
    from mcdm.media.io import write_video
    from mcdm.eval.features import DlibFrameFeatures

    if isinstance(pipe, (str, Path)):
        from mcdm.pipelines.mcdm import MCDMPipeline

        pipe = MCDMPipeline.from_models_dir(pipe, params)
    p, fps, rate = params.eval, params.data.fps, params.data.audio_rate
    faces = faces or DlibFrameFeatures(min_side=p.dlib_min_side)
    index = read_index(features_dir)
    test = index[index["split"] == "test"]
    if test.empty:
        raise McdmError("features: the test split holds no clip for the long-term curve")
    chosen, source = test[test["long_term"]], "long_term"
    if chosen.empty:
        chosen, source = test.sort_values("n_frames", ascending=False), "longest test clip (no long_term clip in the test split)"
    chosen = chosen.sort_values("clip_id").head(p.long_term_clips)
    k = p.long_term_every
    tables, lengths = [], []
    for row in chosen.to_dict("records"):
        clip = ClipFeatures(row["file"])
        n = min(clip.n_frames, max(1, int(round(p.long_term_seconds * fps))))
        ref, ref_lm = clip.frames(0, 1), clip.landmarks(0, 1)
        wave = clip.waveform(n, fps, rate)
        ssim = np.full(n, np.nan)
        identity, identity_gt = np.full(n, np.nan), np.full(n, np.nan)
        try:
            M.identity_curve(ref[0], ref, faces)
            with_identity = True
        except McdmError:
            with_identity = False  # no face in the reference: identity cannot be measured (NaN)
        ref_latent, ref_emb = pipe.encode_reference(ref, ref_lm)
        feats = pipe.audio_features(wave, n)[None]
        lm = pose = None
        if p.use_landmarks:
            lm, pose = pipe.prepare_driving(clip.landmarks(0, n), n)
        clips = pipe.iter_clips(ref_latent, ref_emb, feats, landmarks=lm, head_pose=pose,
                                num_inference_steps=p.steps, generator=torch.Generator().manual_seed(params.seed))
        bar = tqdm(total=n, desc=f"long-term {row['clip_id']}", unit="frame", disable=not progress)

        def frames():
            for state in clips:
                fake = state.frames[0]
                s, e = state.start, state.start + len(fake)
                gt = clip.frames(s, e)
                ssim[s:e] = M.ssim(gt, fake, 255.0)
                picks = np.arange(s + (-s) % k, e, k)
                if with_identity and len(picks):
                    identity[picks] = M.identity_curve(ref[0], fake[picks - s], faces)
                    identity_gt[picks] = M.identity_curve(ref[0], gt[picks - s], faces)
                bar.update(len(fake))
                yield from fake

        if video_dir is not None:
            write_video(Path(video_dir) / f"long_term_{row['clip_id']}.mp4", frames(), fps=fps, audio=wave, audio_rate=rate)
        else:
            for _ in frames():
                pass
        bar.close()
        lengths.append(n)
        starts = np.arange(0, n, k)
        tables.append(pd.DataFrame({
            "frame": starts,
            "ssim": [np.nanmean(ssim[f:f + k]) for f in starts],
            "identity": identity[starts],
            "identity_gt": identity_gt[starts],
        }))
    curve = pd.concat(tables).groupby("frame", as_index=False).mean() if len(tables) > 1 else tables[0]
    _write_csv(curve, Path(csv_path))
    if png_path is not None:
        name = label or pipe.variant
        plot_long_term({name: curve}, png_path, title=f"long-term generation ({name}, {max(lengths) / fps:.1f} s, "
                                                      f"{', '.join(chosen['clip_id'])})")
    tail = max(1, int(round(p.drift_tail * len(curve))))

    def first_last(col):
        values = curve[col].to_numpy(np.float64)
        return _nanmean(values[:tail]), _nanmean(values[-tail:])

    s_first, s_last = first_last("ssim")
    return _jsonable({
        "clips": list(chosen["clip_id"]), "source": source, "frames": int(max(lengths)),
        "seconds": float(max(lengths) / fps), "every": k,
        "ssim_mean": _nanmean(curve["ssim"]), "ssim_first": s_first, "ssim_last": s_last,
        "ssim_drift": None if s_first is None or s_last is None else s_last - s_first,
        "identity_mean": _nanmean(curve["identity"]), "identity_drift": M.curve_drift(curve["identity"], p.drift_tail),
        "identity_gt_mean": _nanmean(curve["identity_gt"]),
        "identity_gt_drift": M.curve_drift(curve["identity_gt"], p.drift_tail),
        "identity_no_face_rows": int(np.isnan(curve["identity"]).sum()),
    })


# ---------------------------------------------------------------------------------------------- the stage
def generate_batched(pipe, refs: list, ref_landmarks: list, audios: list, lengths: list[int], params: Params,
                     landmarks: Optional[list] = None, desc: str = "generating", progress: bool = True):
    """Generate one video per reference / audio, ``eval.batch_size`` at a time (similar lengths share
    a batch; a batch runs to its longest and each video is cut to its own length), with the generator
    seeded by ``seed``. ``landmarks``: per item (n_i, 68, 2) driving landmarks, the last repeated to
    fill a batch. Returns (videos, generation seconds per item), in input order."""
    p = params.eval
    videos, seconds = [None] * len(lengths), [0.0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    generator = torch.Generator().manual_seed(params.seed)
    bar = tqdm(total=sum(lengths), desc=desc, unit="frame", disable=not progress)
    for b in range(0, len(order), p.batch_size):
        batch = order[b:b + p.batch_size]
        n = max(lengths[i] for i in batch)
        lm = None
        if landmarks is not None:
            lm = np.stack([np.concatenate([landmarks[i], np.repeat(landmarks[i][-1:], n - lengths[i], 0)]) for i in batch])
        t0 = time.perf_counter()
        fake = pipe.generate_batch(np.stack([refs[i] for i in batch]), [audios[i] for i in batch], n,
                                   ref_landmarks=np.stack([ref_landmarks[i] for i in batch]), landmarks=lm,
                                   num_inference_steps=p.steps, generator=generator, progress=False)
        per_item = (time.perf_counter() - t0) / len(batch)
        for i, video in zip(batch, fake):
            videos[i], seconds[i] = video[: lengths[i]], per_item
        bar.update(sum(lengths[i] for i in batch))
    bar.close()
    return videos, seconds


def generate_test_set(pipe, clips: pd.DataFrame, params: Params, progress: bool = True) -> dict:
    """Generate every selected test clip; returns ids, real / fake videos, refs, audios, timing."""
    p, fps, rate = params.eval, params.data.fps, params.data.audio_rate
    limit = None if p.clip_seconds is None else max(1, int(round(p.clip_seconds * fps)))
    items = []
    for row in clips.to_dict("records"):
        clip = ClipFeatures(row["file"])
        n = clip.n_frames if limit is None else min(clip.n_frames, limit)
        items.append({"clip_id": row["clip_id"], "long_term": bool(row["long_term"]), "n": n,
                      "real": clip.frames(0, n), "landmarks": clip.landmarks(0, n),
                      "audio": clip.waveform(n, fps, rate)})
    lm = [it["landmarks"] for it in items] if p.use_landmarks else None
    started = time.perf_counter()
    videos, seconds = generate_batched(pipe, [it["real"][0] for it in items], [it["landmarks"][0] for it in items],
                                       [it["audio"] for it in items], [it["n"] for it in items], params,
                                       landmarks=lm, desc="generating test clips", progress=progress)
    for it, video, sec in zip(items, videos, seconds):
        it["fake"], it["gen_seconds"] = video, sec
    elapsed = time.perf_counter() - started
    frames = sum(it["n"] for it in items)
    return {"items": items, "seconds": elapsed, "frames": frames}


def evaluate(features_dir: str | Path, models_dir: str | Path, syncnet: Optional[str | Path], out_dir: str | Path,
             samples_dir: str | Path, params: Params, pipe=None, progress: bool = True, baselines: bool = True) -> dict:
    """Run the stage (see the module docstring); returns the content of metrics.json. ``baselines``
    False: the model's metrics only (``baselines`` and ``checks`` null)."""
    from mcdm.media.io import write_video
    from mcdm.pipelines.mcdm import MCDMPipeline

    out_dir, samples_dir = Path(out_dir), Path(samples_dir)
    p = params.eval
    index = read_index(features_dir)
    clips = select_test_clips(index, p.max_test_clips)
    if pipe is None:
        pipe = MCDMPipeline.from_models_dir(models_dir, params)
    pipe.check_variant(params.variant)
    if syncnet is not None and not Path(syncnet).exists():
        raise MissingStageOutput(syncnet, "syncnet_train")
    suite = M.MetricSuite(p, syncnet=syncnet, fps=params.data.fps, sync_max_offset=params.data.syncnet.max_offset)

    # 1. generate the test clips
    gen = generate_test_set(pipe, clips, params, progress)
    items = gen["items"]
    real = [it["real"] for it in items]
    fake = [it["fake"] for it in items]
    refs = np.stack([it["real"][0] for it in items])
    audios = [it["audio"] for it in items]
    # 2. metrics of the model and of the trivial baselines, same backends, same run
    reconstructed = None
    if baselines:
        from mcdm.train.base_models.vae import reconstruct

        reconstructed = [reconstruct(pipe.vae, v) for v in real]
    prefetch_faces(suite, [real, fake] + ([reconstructed] if baselines else []), params)
    full, per_clip = video_metrics(suite, real, fake, refs, audios)
    static = ground = autoencoder = None
    static_clip = ground_clip = [{}] * len(items)
    if baselines:
        static_videos = [np.repeat(r[None], len(v), axis=0) for r, v in zip(refs, real)]
        static, static_clip = video_metrics(suite, real, static_videos, refs, audios)
        ground, ground_clip = video_metrics(suite, real, [v.copy() for v in real], refs, audios)
        autoencoder, _ = video_metrics(suite, real, reconstructed, refs, audios)
    rows = []
    for it, own, st, gt in zip(items, per_clip, static_clip, ground_clip):
        rows.append({"clip_id": it["clip_id"], "long_term": it["long_term"], "n_frames": it["n"], **own,
                     "static_sync_c": st.get("sync_c"), "ground_truth_sync_c": gt.get("sync_c"),
                     "gen_seconds": it["gen_seconds"]})
    _write_csv(pd.DataFrame(rows), out_dir / "eval_clips.csv")
    # 3. pictures: the frame grid, sample mp4s with their audio
    g = min(p.grid_clips, len(items))
    frame_grid(refs[:g], real[:g], fake[:g], [it["clip_id"] for it in items[:g]], params.data.fps, p.grid_times,
               out_dir / "eval_grid.png")
    samples_dir.mkdir(parents=True, exist_ok=True)
    for old in samples_dir.glob("*.mp4"):
        old.unlink()
    for it in items[: p.n_samples]:
        write_video(samples_dir / f"{it['clip_id']}.mp4", it["fake"], fps=params.data.fps, audio=it["audio"],
                    audio_rate=params.data.audio_rate)
    # 4. the long-term curve (Figure 5); eval.long_term_clips 0 skips it
    long_term = None
    if p.long_term_clips:
        long_term = long_term_curve(pipe, features_dir, out_dir / "long_term.csv", params,
                                    png_path=out_dir / "long_term.png", video_dir=samples_dir if p.n_samples else None,
                                    faces=suite.faces, progress=progress)
    metrics = {
        **full,
        "baselines": {"static_reference": static, "ground_truth": ground, "autoencoder": autoencoder}
        if baselines else None,
        "checks": comparison_checks(full, static, autoencoder) if baselines else None,
        "long_term": long_term,
        "variant": pipe.variant, "alpha": float(pipe.denoiser.config.alpha), "steps": p.steps,
        "params_hash": params.hash(), "checkpoint": pipe.config.provenance.get("source"),
        "n_clips": len(items), "frames": gen["frames"],
        "generation_seconds": gen["seconds"], "seconds_per_frame": gen["seconds"] / max(gen["frames"], 1),
    }
    _write_json(metrics, out_dir / "metrics.json")
    return _jsonable(metrics)


# ---------------------------------------------------------------------------------------------- tracking
def numeric_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Finite numbers of (nested) metrics.json, keys joined with '.' (what MLflow records)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(numeric_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


def _stage3_info(models_dir: str | Path) -> dict:
    from mcdm.pipelines.mcdm import MODELS_LAYOUT, STAGE_JSON

    path = Path(models_dir) / Path(MODELS_LAYOUT["denoiser"][0]).parent / STAGE_JSON
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _model_version(client, params: Params, stage3: dict) -> tuple[Optional[str], Optional[str]]:
    """The registered version of this stage-3 output and its run: ``stage.json``'s ``model_version``,
    else the newest version logged by its ``run_id``, else the newest tagged with its ``params_hash``."""
    name = params.registry.name
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # noqa: BLE001 -- no registry (yet): nothing to promote
        return None, None
    by_number = {str(v.version): v for v in versions}
    if str(stage3.get("model_version")) in by_number:
        v = by_number[str(stage3["model_version"])]
        return str(v.version), v.run_id
    for match in (lambda v: stage3.get("run_id") and v.run_id == stage3["run_id"],
                  lambda v: v.tags.get("params_hash") == stage3.get("params_hash", params.hash())):
        hits = sorted((v for v in versions if match(v)), key=lambda v: int(v.version))
        if hits:
            return str(hits[-1].version), hits[-1].run_id
    return None, None


def track_evaluation(params: Params, metrics: dict, models_dir: str | Path, artifacts: list[str | Path], *,
                     stage: str = STAGE, prefix: str = "eval.", promote: bool = True) -> dict:
    """Log an evaluation to MLflow: a ``stage`` run (metrics + reports as artifacts); the metrics
    also on the stage-3 run of the registered version, named ``<prefix><metric>``; then, with
    ``promote``, ``champion`` moves by ``registry.primary_metric`` (main line only, DECISIONS #16).
    The open_set stage logs through here too (prefix ``open_set.``, no promotion). Returns what was done."""
    import warnings

    from mcdm.tracking import runs as tracking

    numbers = numeric_metrics(metrics)
    stage3 = _stage3_info(models_dir)
    done: dict = {}
    with tracking.stage_run(params, stage, tags={"stage3_run_id": stage3.get("run_id", "")}) as tracker:
        tracker.log_metrics(numbers, step=0)
        for path in artifacts:
            if Path(path).exists():
                tracker.log_artifact(path, stage)
        done["run_id"] = tracker.run_id
    if not tracking.is_main_line(params):
        done["promotion"] = "not the main line (variant full at the default alpha): no registry update"
        return done
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri = tracking.tracking_uri()
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        version, run_id = _model_version(client, params, stage3)
        if version is None:
            done["promotion"] = f"no registered version of {params.registry.name} for this stage-3 output"
            return done
        ts = int(time.time() * 1000)
        items = [Metric(f"{prefix}{k}", v, ts, 0) for k, v in numbers.items()]
        for i in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[i:i + 1000])
        done["version"] = version
        if not promote:
            done["promotion"] = f"metrics logged on version {version} as {prefix}*; no promotion from {stage}"
            return done
        value = metrics.get(params.registry.primary_metric)
        if value is None:
            done["promotion"] = f"{params.registry.primary_metric} is not available: version {version} not ranked"
            return done
        champion = tracking.promote_by_metric(params, version, float(value), uri=uri)
        done["champion"] = champion
        done["promotion"] = f"version {version} {'is now' if champion else 'stays'} " \
                            f"{'champion' if champion else 'candidate'} ({params.registry.primary_metric} {value:.4g})"
    except McdmError as err:
        warnings.warn(f"registry: {err}", tracking.TrackingUnavailable, stacklevel=2)
        done["promotion"] = f"failed: {err}"
    except Exception as err:  # noqa: BLE001 -- the evaluation is written; a registry outage must not undo it
        warnings.warn(f"registry at {uri} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                      tracking.TrackingUnavailable, stacklevel=2)
        done["promotion"] = f"failed: {type(err).__name__}"
    return done
