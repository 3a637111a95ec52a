"""`mcdm evaluate`: the evaluate stage (paper Sec. 4, Figure 5; DECISIONS #11, #16, #20).

Thin wrapper over :func:`mcdm.eval.evaluate.evaluate`: generates the test clips with the trained
pipeline, measures them beside the static-reference and ground-truth baselines, writes metrics.json,
the per-clip CSV, the frame grid, sample mp4s and the long-term curve; then logs the run to MLflow
and, on the main line, ranks the registered stage-3 version by ``registry.primary_metric``.
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="generate the test clips, metrics vs baselines, long-term curve")
    p.add_argument("--features", required=True, help="features folder (index.parquet + <clip_id>.safetensors)")
    p.add_argument("--models", required=True, help="models folder of the stages (base/, stage1/, stage2/, stage3/, motion_encoders/)")
    p.add_argument("--syncnet", required=True, help="SyncNet folder for Sync-C / Sync-D (e.g. models/syncnet)")
    p.add_argument("--out", required=True, help="reports folder: metrics.json, eval_clips.csv, eval_grid.png, long_term.csv/png")
    p.add_argument("--samples", required=True, help="folder of the sample mp4s (generated clips with their audio)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow nor touch the registry")
    p.set_defaults(func=run)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def run(args) -> int:
    params = load_params(args.params)
    from pathlib import Path

    import torch

    from mcdm.eval.evaluate import evaluate, track_evaluation

    torch.set_num_threads(params.eval.threads)
    metrics = evaluate(args.features, args.models, args.syncnet, args.out, args.samples, params)
    base = metrics["baselines"]["static_reference"]
    lt = metrics["long_term"]
    print(f"wrote {Path(args.out) / 'metrics.json'}: {metrics['n_clips']} test clips, {metrics['frames']} frames "
          f"({metrics['seconds_per_frame']:.3f} s/frame), variant {metrics['variant']}")
    for name in ("fid", "fvd", "ssim", "efid", "sync_c", "sync_d", "identity"):
        extra = f" [{metrics.get(name + '_backend')}]" if metrics.get(name + "_backend") else ""
        error = f" ({metrics[name + '_error']})" if metrics.get(name + "_error") else ""
        print(f"  {name:9s} {_fmt(metrics.get(name)):>10s}   static reference {_fmt(base.get(name)):>10s}{extra}{error}")
    print(f"  identity of ground truth {_fmt(metrics.get('identity_gt'))}; long-term ({lt['seconds']:.0f} s): "
          f"SSIM {_fmt(lt['ssim_first'])} -> {_fmt(lt['ssim_last'])}, identity drift {_fmt(lt['identity_drift'])}")
    for check, ok in metrics["checks"].items():
        print(f"  check {check}: {'yes' if ok else 'NO' if ok is not None else 'n/a (metric missing)'}")
    if not args.no_tracking:
        out = Path(args.out)
        done = track_evaluation(params, metrics, args.models, [out / "metrics.json", out / "eval_clips.csv",
                                                              out / "eval_grid.png", out / "long_term.csv",
                                                              out / "long_term.png", Path(args.samples)])
        print(f"  mlflow: run {done.get('run_id')}; {done.get('promotion', '')}")
    return 0
