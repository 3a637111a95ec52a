"""`mcdm ablate`: one member of the ablation matrix or of the alpha sweep (decisions.md #10): retrain the
stages its variant changes, take the others from the main line, evaluate it."""
from __future__ import annotations

import torch

from mcdm.commands.args import FEATURES, MODELS, NO_TRACKING, SYNCNET, Command, fmt, optional, required
from mcdm.eval.ablation_tables import IDENTITY, METRICS
from mcdm.experiments.ablate import run_member


def run(params, args) -> None:
    torch.set_num_threads(params.eval.threads)
    metrics = run_member(params, args.variant, args.seed, args.alpha, args.features, args.models, args.syncnet,
                         args.out, args.reports, args.samples, args.checkpoints, tracking=not args.no_tracking)
    member = metrics["member"]
    print(f"wrote {args.reports}/metrics.json: {member['kind']} member {member['name']} (variant {member['variant']}, "
          f"seed {member['seed']}, alpha {member['alpha']}), retrained stages {member['retrained_stages']}, "
          f"{member['wall_s']:.0f} s")
    print("  " + "; ".join(f"{m.label} {fmt(metrics.get(m.key))} [{metrics.get(m.key + '_backend')}]"
                           for m in (*METRICS, IDENTITY)))


COMMAND = Command(run, (
    optional("--variant", "variant of the member (default: params' variant)"),
    optional("--seed", "training seed of the stages it retrains (default: params' seed)", type=int),
    optional("--alpha", "a sweep member at this Eq. 5 alpha (stage 3 only); without it an ablation member at "
                        "ablations.alpha", type=float),
    FEATURES, MODELS, SYNCNET,
    required("--out", "the member's models folder (its retrained stage<k>/ folders); its name names the member"),
    required("--reports", "the member's reports folder (metrics.json, eval_clips.csv, long_term.csv, ...)"),
    required("--samples", "folder of the member's sample mp4s"),
    required("--checkpoints", "DeepSpeed checkpoints of the member's stages (resumed when present)"),
    NO_TRACKING,
))
