"""`mcdm ablate`: one member of the ablation matrix or the alpha sweep (DVC matrix stages `ablation`, `sweep`).

Thin wrapper over :func:`mcdm.experiments.ablate.run_member`: retrains only the stages the member's variant
changes (at ``ablations.steps_fraction`` of their steps), takes the others from the main line's
models folder, evaluates like the ``evaluate`` stage and writes the member's metrics.json.
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("ablate", help="one ablation / alpha-sweep member: retrain its stages, evaluate it")
    p.add_argument("--variant", help="variant of the member (default: params' variant)")
    p.add_argument("--seed", type=int, help="training seed of the stages it retrains (default: params' seed)")
    p.add_argument("--alpha", type=float,
                   help="a sweep member at this Eq. 5 alpha (stage 3 only); without it an ablation member at ablations.alpha")
    p.add_argument("--features", required=True, help="features folder (e.g. data/features)")
    p.add_argument("--models", required=True, help="the main line's models folder (base/, motion_encoders/, stage1-3/)")
    p.add_argument("--syncnet", required=True, help="SyncNet folder for Sync-C / Sync-D (e.g. models/syncnet)")
    p.add_argument("--out", required=True, help="the member's models folder (its retrained stage<k>/ folders); its name names the member")
    p.add_argument("--reports", required=True, help="the member's reports folder (metrics.json, eval_clips.csv, long_term.csv, ...)")
    p.add_argument("--samples", required=True, help="folder of the member's sample mp4s")
    p.add_argument("--checkpoints", required=True, help="DeepSpeed checkpoints of the member's stages (resumed when present)")
    p.add_argument("--no-tracking", action="store_true", help="do not log the evaluation to MLflow")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    import torch

    from mcdm.experiments.ablate import run_member
    from mcdm.eval.report import IDENTITY, METRICS, fmt

    torch.set_num_threads(params.eval.threads)
    metrics = run_member(params, args.variant, args.seed, args.alpha, args.features, args.models, args.syncnet,
                         args.out, args.reports, args.samples, args.checkpoints, tracking=not args.no_tracking)
    member = metrics["member"]
    print(f"wrote {args.reports}/metrics.json: {member['kind']} member {member['name']} (variant {member['variant']}, "
          f"seed {member['seed']}, alpha {member['alpha']}), retrained stages {member['retrained_stages']}, "
          f"{member['wall_s']:.0f} s")
    print("  " + "; ".join(f"{m.label} {fmt(metrics.get(m.key))} [{metrics.get(m.key + '_backend')}]"
                           for m in (*METRICS, IDENTITY)))
    return 0
