"""`mcdm open-set`: the open-set table (unseen portraits x held-out audio of other languages:
Sync-C / Sync-D, identity, FID against training frames; decisions.md #23)."""
from __future__ import annotations

import torch

from mcdm.commands.args import FEATURES, MODELS, NO_TRACKING, SYNCNET, Command, fmt, required
from mcdm.eval.open_set import open_set
from mcdm.eval.record import track_evaluation


def run(params, args) -> None:
    torch.set_num_threads(params.eval.threads)
    summary = open_set(args.pairs, args.features, args.models, args.syncnet, args.table, args.summary, params)
    overall = summary["overall"]
    print(f"wrote {args.table} and {args.summary}: {summary['n_pairs']} of {summary['pairs_available']} open-set pairs, "
          f"audio languages {', '.join(summary['languages']) or 'none'} ({summary['seconds']:.1f} s)")
    for name in ("sync_c", "sync_d", "identity", "identity_gt", "fid"):
        error = f" ({overall[name + '_error']})" if overall.get(name + "_error") else ""
        print(f"  {name:11s} {fmt(overall.get(name)):>10s}  [{overall.get(name + '_backend') or 'n/a'}]{error}")
    if not args.no_tracking:
        numbers = {"overall": overall, "by_language": summary.get("by_language", {}), "n_pairs": summary["n_pairs"]}
        done = track_evaluation(params, numbers, args.models, [args.table, args.summary], stage="open_set",
                                prefix="open_set.", promote=False)
        print(f"  mlflow: run {done.get('run_id')}; {done.get('promotion', '')}")


COMMAND = Command(run, (
    required("--pairs", "the split's open-set table (data/split/open_set.parquet)"),
    FEATURES, MODELS, SYNCNET,
    required("--table", "output CSV, a row per portrait x audio pair"),
    required("--summary", "output JSON: means per audio language and overall, backends, params hash"),
    NO_TRACKING,
))
