"""`mcdm evaluate`: the evaluate stage (paper Sec. 4, Figure 5; decisions.md #11, #16, 20).

Generates the test clips with the trained pipeline, measures them beside the static-reference,
ground-truth, autoencoder and reversed ground-truth baselines, writes metrics.json (the headline) and
metrics_details.json, the per-clip CSV and features, the frame grid, sample mp4s and the long-term
curve and windows; then logs the run to MLflow and, on the main line, ranks the registered
stage-3 version by ``registry.primary_metric``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mcdm.commands.args import FEATURES, MODELS, NO_TRACKING, SYNCNET, Command, fmt, required
from mcdm.eval.evaluate import evaluate
from mcdm.eval.metric_files import DETAILS_JSON, FEATURES_NPZ, METRICS_JSON, headline
from mcdm.eval.record import track_evaluation


def run(params, args) -> None:
    torch.set_num_threads(params.eval.threads)
    metrics = evaluate(args.features, args.models, args.syncnet, args.out, args.samples, params)
    base = metrics["baselines"]["static_reference"]
    lt = metrics["long_term"]
    print(f"wrote {Path(args.out) / METRICS_JSON} and {DETAILS_JSON}: {metrics['n_clips']} test clips, "
          f"{metrics['frames']} frames ({metrics['seconds_per_frame']:.3f} s/frame), variant {metrics['variant']}")
    for name in ("fid", "fvd", "ssim", "efid", "sync_c", "sync_d", "identity"):
        extra = f" [{metrics.get(name + '_backend')}]" if metrics.get(name + "_backend") else ""
        error = f" ({metrics[name + '_error']})" if metrics.get(name + "_error") else ""
        print(f"  {name:9s} {fmt(metrics.get(name)):>10s}   static reference {fmt(base.get(name)):>10s}{extra}{error}")
    print(f"  generated frames without a face: {fmt(metrics.get('failure_rate'))} (charged, not dropped)")
    if lt:
        print(f"  identity of ground truth {fmt(metrics.get('identity_gt'))}; long-term ({lt['seconds']:.0f} s): "
              f"SSIM {fmt(lt['ssim_first'])} -> {fmt(lt['ssim_last'])}, identity drift {fmt(lt['identity_drift'])}, "
              f"per {lt['window_seconds']:g} s window: SSIM decay {fmt(lt['window_ssim_decay'])}")
    for check, ok in metrics["checks"].items():
        print(f"  check {check}: {'yes' if ok else 'NO' if ok is not None else 'n/a (metric missing)'}")
    if not args.no_tracking:
        out = Path(args.out)
        files = [METRICS_JSON, DETAILS_JSON, FEATURES_NPZ, "eval_clips.csv", "eval_grid.png", "long_term.csv",
                 "long_term_windows.csv", "long_term.png"]
        done = track_evaluation(params, headline(metrics), args.models, [out / f for f in files] + [Path(args.samples)])
        print(f"  mlflow: run {done.get('run_id')}; {done.get('promotion', '')}")


COMMAND = Command(run, (
    FEATURES, MODELS, SYNCNET,
    required("--out", "reports folder: metrics.json, metrics_details.json, features.npz, eval_clips.csv, "
                      "eval_grid.png, long_term.csv/png, long_term_windows.csv"),
    required("--samples", "folder of the sample mp4s (generated clips with their audio)"),
    NO_TRACKING,
))
