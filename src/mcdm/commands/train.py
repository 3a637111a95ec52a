"""`mcdm train --stage N`: the train_stage1/2/3 DVC stages (one entry point, one engine).

Thin wrapper over :func:`mcdm.train.stages.run_stage`. Stage 1 reads the features and the base models;
stage 2 the features, the motion encoders and stage 1's output (its landmark guider); stage 3 all of
them plus stage 2's output. Earlier stages' folders are given with ``--prev`` (repeatable).
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("train", help="train one MCDM stage (1: archived-clip prior, 2: present-clip prior, "
                                     "3: present-clip attention + MTA)")
    p.add_argument("--stage", type=int, required=True, choices=(1, 2, 3))
    p.add_argument("--features", required=True, help="features folder (index.parquet, meta.json, <clip_id>.safetensors)")
    p.add_argument("--base", help="base models folder (vae/, unet/, scheduler/, encoders.json); stages 1 and 3")
    p.add_argument("--motion-encoders", help="motion encoders folder (head/, lip/, lip_audio/, expression/); stages 2 and 3")
    p.add_argument("--prev", action="append", default=[],
                   help="an earlier stage's output folder (stage 2: stage 1's; stage 3: stage 1's and stage 2's)")
    p.add_argument("--out", required=True, help="export folder of this stage")
    p.add_argument("--checkpoints", required=True, help="DeepSpeed checkpoint folder (resumed when it holds one)")
    p.add_argument("--metrics", help="metrics JSON (loss_first10, loss_last10, steps, wall_s, samples_per_s, peak_rss_mb)")
    p.add_argument("--loss-csv", help="loss curve CSV (step,loss) for `dvc plots`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param for this run, validated by the schema (matrix stages: "
                        "--set variant=${item.variant} --set seed=${item.seed})")
    p.set_defaults(func=run)


def with_overrides(params, assignments: list[str]):
    """``params`` with ``key.sub=value`` assignments (values parsed as YAML) applied and validated."""
    import yaml

    from mcdm.config import deep_merge, validate
    from mcdm.errors import McdmError

    overlay: dict = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise McdmError(f"--set {item!r}: expected KEY=VALUE")
        node = overlay
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return validate(deep_merge(params.model_dump(mode="json"), overlay), "--set") if overlay else params


def run(args) -> int:
    params = with_overrides(load_params(args.params), args.set)
    from mcdm.train.stages import StageInputs, run_stage

    inputs = StageInputs(features=args.features, base=args.base, motion_encoders=args.motion_encoders,
                         prev=tuple(args.prev))
    metrics = run_stage(params, args.stage, inputs, args.out, args.checkpoints, args.metrics, args.loss_csv)
    if metrics.get("steps"):
        print(f"wrote {args.out}: stage {args.stage}, {metrics['steps']} steps, loss {metrics['loss_first10']:.4f} "
              f"(first 10%) -> {metrics['loss_last10']:.4f} (last 10%), {metrics['samples_per_s']:.2f} samples/s, "
              f"{metrics['wall_s']:.0f} s")
    else:
        print(f"wrote {args.out}: stage {args.stage} (no training steps for variant {params.variant})")
    return 0
