"""`mcdm train --stage N`: the train_stage1/2/3 DVC stages (one entry point, one engine).

Stage 1 reads the features and the base models; stage 2 the features, the motion encoders and stage
1's output (its landmark guider); stage 3 all of them plus stage 2's output. Earlier stages'
folders are given with ``--prev`` (repeatable).
"""
from __future__ import annotations

from mcdm.commands.args import FEATURES, Arg, Command, fmt, optional, out, required
from mcdm.config import with_overrides
from mcdm.train.stages.inputs import StageInputs
from mcdm.train.stages.run import run_stage


def run(params, args) -> None:
    params = with_overrides(params, args.set)
    inputs = StageInputs(features=args.features, base=args.base, motion_encoders=args.motion_encoders,
                         prev=tuple(args.prev))
    metrics = run_stage(params, args.stage, inputs, args.out, args.checkpoints, args.metrics, args.loss_csv)
    if metrics.get("rank"):  # a launched rank other than 0: rank 0 reports
        return
    if not metrics.get("steps"):
        print(f"wrote {args.out}: stage {args.stage} (no training steps for variant {params.variant})")
        return
    if not metrics.get("steps_run"):  # the checkpoint already held the last step: re-exported, nothing trained
        print(f"wrote {args.out}: stage {args.stage}, all {metrics['steps']} steps were done (checkpoint of step "
              f"{metrics['resumed_from']} in {args.checkpoints}): re-exported without training")
        return
    print(f"wrote {args.out}: stage {args.stage}, {metrics['steps']} steps, loss {fmt(metrics['loss_first10'])} "
          f"(first 10%) -> {fmt(metrics['loss_last10'])} (last 10%), {fmt(metrics['samples_per_s'])} samples/s, "
          f"{metrics['wall_s']:.0f} s")


COMMAND = Command(run, (
    Arg(("--stage",), "1: archived-clip prior, 2: present-clip prior, 3: present-clip attention + MTA",
        {"type": int, "required": True, "choices": (1, 2, 3)}),
    FEATURES,
    optional("--base", "base models folder (vae/, unet/, scheduler/, encoders.json); stages 1 and 3"),
    optional("--motion-encoders", "motion encoders folder (head/, lip/, lip_audio/, expression/); stages 2 and 3"),
    Arg(("--prev",), "an earlier stage's output folder (stage 2: stage 1's; stage 3: stage 1's and stage 2's)",
        {"action": "append", "default": []}),
    out("export folder of this stage"),
    required("--checkpoints", "DeepSpeed checkpoint folder (resumed when it holds one)"),
    optional("--metrics", "metrics JSON (loss_first10, loss_last10, steps, wall_s, samples_per_s, peak_rss_mb)"),
    optional("--loss-csv", "loss curve CSV (step,loss) for `dvc plots`"),
    Arg(("--set",), "override a param for this run, validated by the schema (KEY=VALUE, repeatable)",
        {"action": "append", "default": [], "metavar": "KEY=VALUE"}),
))
