"""`mcdm open-set`: the open_set stage (DECISIONS #23): unseen portraits x held-out audio in several languages.

Thin wrapper over :func:`mcdm.eval.open_set.open_set`: generates each portrait x audio pair of the
split's open-set table with the main-line pipeline and measures Sync-C / Sync-D, identity and FID
against training frames with evaluate's backends; writes the per-pair table and the per-language summary.
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("open-set", help="open-set table: unseen portraits x held-out audio (Sync-C/D, identity, FID)")
    p.add_argument("--pairs", required=True, help="the split's open-set table (data/split/open_set.parquet)")
    p.add_argument("--features", required=True, help="features folder (index.parquet + <clip_id>.safetensors)")
    p.add_argument("--models", required=True, help="models folder of the main line (base/, stage1-3/, motion_encoders/)")
    p.add_argument("--syncnet", required=True, help="SyncNet folder for Sync-C / Sync-D (e.g. models/syncnet)")
    p.add_argument("--table", required=True, help="output CSV, a row per portrait x audio pair")
    p.add_argument("--summary", required=True, help="output JSON: means per audio language and overall, backends, params hash")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    import torch

    from mcdm.eval.open_set import open_set
    from mcdm.eval.report import fmt

    torch.set_num_threads(params.eval.threads)
    summary = open_set(args.pairs, args.features, args.models, args.syncnet, args.table, args.summary, params)
    overall = summary["overall"]
    print(f"wrote {args.table} and {args.summary}: {summary['n_pairs']} of {summary['pairs_available']} open-set pairs, "
          f"audio languages {', '.join(summary['languages']) or 'none'} ({summary['seconds']:.1f} s)")
    for name in ("sync_c", "sync_d", "identity", "identity_gt", "fid"):
        error = f" ({overall[name + '_error']})" if overall.get(name + "_error") else ""
        print(f"  {name:11s} {fmt(overall.get(name)):>10s}  [{overall.get(name + '_backend') or 'n/a'}]{error}")
    if not args.no_tracking:
        from mcdm.eval.evaluate import track_evaluation

        numbers = {"overall": overall, "by_language": summary.get("by_language", {}), "n_pairs": summary["n_pairs"]}
        done = track_evaluation(params, numbers, args.models, [args.table, args.summary], stage="open_set",
                                prefix="open_set.", promote=False)
        print(f"  mlflow: run {done.get('run_id')}; {done.get('promotion', '')}")
    return 0
