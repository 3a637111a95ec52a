"""evaluate: generate the test clips with the trained pipeline and measure them (paper Sec. 4, Fig. 5).

1. Test set. Up to ``eval.max_test_clips`` test clips of ``data/features`` (regular clips first, then
   the long ones), each generated for at most ``eval.clip_seconds`` from ITS reference frame (frame 0,
   the frame the identity embedding of training came from) and ITS audio, in batches of
   ``eval.batch_size`` (optionally driven by the ground truth's landmarks, ``eval.use_landmarks``).
2. Metrics (``MetricSuite`` backends: FID, FVD, SSIM, E-FID, identity, Sync-C/D), each one computed on
   its own so that one that cannot be computed (e.g. fewer than 2 ground-truth frames with a face) is
   recorded as null with its reason instead of stopping the stage. In the same run, with the same backends,
   the trivial baselines: ``static_reference`` (the reference frame repeated: identity 0 by
   construction, a bound, decisions.md #20), ``ground_truth`` (ground truth vs itself: SSIM 1) and
   ``autoencoder`` (ground truth through the frozen VAE and back: what a denoiser that reproduced the
   ground truth's latents exactly would score, since every generated frame is a VAE decode; on the
   embedded default's 64 px tiny VAE it is what keeps identity far from ground truth's).
   ``checks`` states, true or false, whether the model beats the static reference on Sync-C and FVD
   and whether its identity distance is within 0.05 of ground truth's (decisions.md #20) and of the
   autoencoder's; ``quality_targets`` whether issue #20's targets for what a person sees are met
   (``mcdm.eval.quality_targets``: resolution, the autoencoder's and the model's identity gaps, lost
   faces, Sync-C against ground truth's, the mouth-opening correlation, sharpness). Ablation and sweep members
   (``baselines=False``) skip the baselines: they do not depend on the model, so the main line's
   ``evaluate`` measures them once for the report.
3. Long-term curve and windows (Figure 5, decisions.md #11; ``mcdm.eval.long_term``): on the
   ``long_term``-flagged test clip(s), generate up to ``eval.long_term_seconds`` and record SSIM against
   ground truth and the identity distance to the reference over the frame index, and SSIM, identity,
   face failures and Sync-C/D per ``eval.long_term_window_seconds`` window, streaming (constant
   memory). Every matrix member runs it too (the claims of Figure 5 compare variants on it).

Generated frames without a face count against the model (``mcdm.eval.failures``): every face-based
metric charges them and reports its failure rate beside it; no metric becomes null because the model
lost its face. One more baseline, ``reversed_ground_truth`` (ground truth played backwards: real
faces, wrong direction of time), shows which metrics see temporal order (FVD, Sync-C).

Outputs (``mcdm.eval.metric_files``): ``<out>/metrics.json`` (the headline: the paper's six metrics,
identity, failure rate, seconds per frame, which are fallbacks), ``<out>/metrics_details.json``
(everything: backends, counts, ``baselines``, ``long_term``, ``checks``), ``<out>/features.npz`` (the
Fréchet metrics' feature rows per clip, for the claims' bootstrap), ``<out>/eval_clips.csv`` (per
clip), ``<out>/eval_grid.png`` (reference | ground truth and generated at several times),
``<out>/frame_strip.png`` (the first test clip's ground truth above its generated frames, every 3rd
frame at full size; the README shows a copy, ``docs/frame_strip.png``),
``<out>/long_term.csv`` + ``long_term_windows.csv`` + ``long_term.png``, and ``<samples>/*.mp4``
(generated clips with their audio).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from mcdm.config import Params
from mcdm.errors import McdmError, MissingStageOutput
from mcdm.eval.long_term import long_term_curve
from mcdm.eval.metric_files import write_metric_files
from mcdm.eval.plots import frame_grid, frame_strip
from mcdm.eval.quality_targets import quality_targets
from mcdm.eval.suite import MetricSuite
from mcdm.eval.test_set import generate_test_set, read_index, select_test_clips
from mcdm.eval.video_metrics import comparison_checks, prefetch_faces, video_metrics
from mcdm.media import layout
from mcdm.media.files import jsonable, write_csv
from mcdm.media.io import write_video
from mcdm.models.vae import reconstruct
from mcdm.pipelines.loading import load_from_models_dir

STAGE = "evaluate"


# ---------------------------------------------------------------------------------------------- metrics
def heldout_psnr(models_dir: str | Path) -> Optional[float]:
    """The VAE's PSNR on the held-out training clips that ``base_models`` measured (its gate), None
    when ``<models>/base/encoders.json`` does not say (weights given by path, a bundle)."""
    try:
        return (layout.read_encoders(Path(models_dir) / "base").get("vae") or {}).get("psnr_heldout")
    except McdmError:
        return None


def evaluate(features_dir: str | Path, models_dir: str | Path, syncnet: Optional[str | Path], out_dir: str | Path,
             samples_dir: str | Path, params: Params, pipe=None, progress: bool = True, baselines: bool = True) -> dict:
    """Run the stage (see the module docstring); returns the full metrics (metrics_details.json).
    ``baselines`` False: the model's metrics only (``baselines`` and ``checks`` null) and no ground
    truth identity on the long-term clips (the main line measures both)."""

    out_dir, samples_dir = Path(out_dir), Path(samples_dir)
    p = params.eval
    index = read_index(features_dir)
    clips = select_test_clips(index, p.max_test_clips)
    if pipe is None:
        pipe = load_from_models_dir(models_dir, params)
    pipe.check_variant(params.variant)
    if syncnet is not None and not Path(syncnet).exists():
        raise MissingStageOutput(syncnet, "syncnet_train")
    suite = MetricSuite(p, syncnet=syncnet, fps=params.data.fps, sync_max_offset=params.data.syncnet.max_offset)

    # 1. generate the test clips
    gen = generate_test_set(pipe, clips, params, progress)
    items = gen["items"]
    real = [it["real"] for it in items]
    fake = [it["fake"] for it in items]
    refs = np.stack([it["real"][0] for it in items])
    audios = [it["audio"] for it in items]
    # 2. metrics of the model and of the trivial baselines, same backends, same run
    arms = {"model": fake}
    if baselines:
        arms.update(static_reference=[np.repeat(r[None], len(v), axis=0) for r, v in zip(refs, real)],
                    ground_truth=[v.copy() for v in real], autoencoder=[reconstruct(pipe.vae, v) for v in real],
                    reversed_ground_truth=[v[::-1].copy() for v in real])
    prefetch_faces(suite, [real, fake] + ([arms["autoencoder"]] if baselines else []), params)
    measured = {arm: video_metrics(suite, real, videos, refs, audios) for arm, videos in arms.items()}
    full, per_clip, _ = measured["model"]
    rows = []
    for i, (it, own) in enumerate(zip(items, per_clip)):
        rows.append({"clip_id": it["clip_id"], "long_term": it["long_term"], "n_frames": it["n"], **own,
                     **{f"{arm}_{k}": measured[arm][1][i].get(k) for arm in arms if arm != "model"
                        for k in ("sync_c", "sync_d", "identity", "ssim", "psnr", "mouth_open_corr")},
                     "gen_seconds": it["gen_seconds"]})
    write_csv(pd.DataFrame(rows), out_dir / "eval_clips.csv")
    # 3. pictures: the frame grid, sample mp4s with their audio
    g = min(p.grid_clips, len(items))
    frame_grid(refs[:g], real[:g], fake[:g], [it["clip_id"] for it in items[:g]], params.data.fps, p.grid_times,
               out_dir / "eval_grid.png")
    if baselines:  # the main line only (a member writes no picture beyond its grid)
        frame_strip(real[0], fake[0], out_dir / "frame_strip.png")
    samples_dir.mkdir(parents=True, exist_ok=True)
    for old in samples_dir.glob("*.mp4"):
        old.unlink()
    for it in items[: p.n_samples]:
        write_video(samples_dir / f"{it['clip_id']}.mp4", it["fake"], fps=params.data.fps, audio=it["audio"],
                    audio_rate=params.data.audio_rate)
    # 4. the long-term curve and windows (Figure 5); eval.long_term_clips 0 skips them
    long_term = None
    if p.long_term_clips:
        long_term = long_term_curve(pipe, features_dir, out_dir / "long_term.csv", params,
                                    png_path=out_dir / "long_term.png", video_dir=samples_dir if p.n_samples else None,
                                    suite=suite, progress=progress, windows_path=out_dir / "long_term_windows.csv",
                                    ground_truth=baselines)
    others = {arm: measured[arm][0] for arm in arms if arm != "model"}
    metrics = {
        **full,
        "failure_rate": full.get("identity_failure_rate"),
        "baselines": others if baselines else None,
        "checks": comparison_checks(full, others["static_reference"], others["autoencoder"]) if baselines else None,
        "quality_targets": quality_targets(full, others, params.data.resolution) if baselines else None,
        "long_term": long_term,
        "variant": pipe.variant, "alpha": float(pipe.denoiser.config.alpha), "steps": p.steps, "seed": params.seed,
        "params_hash": params.hash(), "checkpoint": pipe.config.provenance.get("source"),
        "n_clips": len(items), "frames": gen["frames"], "clips": [it["clip_id"] for it in items],
        "generation_seconds": gen["seconds"], "seconds_per_frame": gen["seconds"] / max(gen["frames"], 1),
    }
    metrics["autoencoder_psnr_heldout"] = heldout_psnr(models_dir)
    metrics = jsonable(metrics)
    write_metric_files(metrics, out_dir, {arm: measured[arm][2] for arm in arms})
    return metrics
