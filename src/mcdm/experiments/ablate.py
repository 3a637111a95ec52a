"""One member of the ablation matrix or of the alpha sweep (paper Tables 4-5, Figure 7; decisions.md #10).

A member retrains only the stages its variant changes, at ``ablations.steps_fraction`` of each
stage's steps, takes every other stage from the main line's ``models/``, and evaluates the assembled
pipeline exactly as the ``evaluate`` stage does:
==========================  ==================  ==================================================
member                      retrains            takes from the main line
==========================  ==================  ==================================================
wo_mta                      stage 3             base, motion encoders, stage 1, stage 2
wo_fpc                      stages 2, 3         base, motion encoders, stage 1 (its guider)
wo_fa, b1, b2               stages 1, 2, 3      base, motion encoders
full (any seed)             stages 1, 2, 3      base, motion encoders: the full model at the
                                                members' budget, the tables' reference row
every alpha of the sweep    stage 3             base, motion encoders, stage 1, stage 2
==========================  ==================  ==================================================

Stage 1 is shared by exactly the variants of ``mcdm.train.stages.SHARED_STAGE1``; stage 2 reads
stage 1's landmark guider, so it is retrained whenever stage 1 is (and for wo_fpc, whose stage 2
fits audio tokens instead of the motion prior). A member's seed seeds the stages it retrains; the
stages it takes were trained at the main line's seed.

Every member generates with the generator seeded by its seed, so members of one seed see the same
noise on the same clips (the claims pair them, ``mcdm.eval.claims``), and every member, ablation or
sweep, is also measured on the long-term clips (``ablations.eval``: ``long_term_seconds``,
``long_term_clips``), per time window.

Members never register model versions (:func:`mcdm.tracking.runs.ablation_member`); their MLflow runs
carry the tags ``variant``, ``seed``, ``alpha``, ``ablation_member`` and ``member_kind`` and are named
``<stage> [ablation|sweep <member>: ...]``.

Outputs: ``<out>/stage<k>/`` for each retrained stage (the same folders ``mcdm train`` exports),
``<reports>/metrics.json`` (the headline, ``mcdm.eval.metric_files``), ``metrics_details.json``
(``evaluate``'s metrics plus ``member``: kind, variant, seed, alpha, the stages retrained and taken,
their steps, losses and times), ``features.npz``, ``eval_clips.csv``, ``eval_grid.png``,
``long_term.csv`` / ``long_term_windows.csv`` / ``.png``, and the sample mp4s in ``<samples>``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from mcdm.config import Params, deep_merge, validate
from mcdm.errors import McdmError, MissingStageOutput
from mcdm.eval.evaluate import evaluate
from mcdm.eval.metric_files import DETAILS_JSON, FEATURES_NPZ, METRICS_JSON, headline, write_metric_files
from mcdm.eval.record import track_evaluation
from mcdm.media.layout import MODELS_LAYOUT
from mcdm.pipelines.loading import load_from_models_dir
from mcdm.tracking import runs as mlflow_tracking
from mcdm.train.stages.inputs import StageInputs
from mcdm.train.stages.run import run_stage

STAGES = (1, 2, 3)
# stages a variant changes (decisions.md #10); ``full`` changes none, but a ``full`` member retrains all
# three at the members' budget (see ``member_stages``)
VARIANT_STAGES: dict[str, tuple[int, ...]] = {
    "full": (),
    "wo_mta": (3,),
    "wo_fpc": (2, 3),
    "wo_fa": (1, 2, 3),
    "b1": (1, 2, 3),
    "b2": (1, 2, 3),
}
ABLATION, SWEEP = "ablation", "sweep"
TRAIN_KEYS = ("steps", "loss_first10", "loss_last10", "fixed_batch_loss_start", "fixed_batch_loss_end",
              "fixed_batch_loss_fell", "final_loss", "resumed_from", "wall_s")


def member_kind(alpha: Optional[float]) -> str:
    """A member given an alpha belongs to the sweep; otherwise to the ablation matrix."""
    return ABLATION if alpha is None else SWEEP


def member_stages(variant: str, kind: str) -> tuple[int, ...]:
    """The stages a member retrains (the module docstring's table)."""
    if variant not in VARIANT_STAGES:
        raise McdmError(f"--variant: unknown variant {variant!r} (choose from {', '.join(VARIANT_STAGES)})")
    if kind == SWEEP:
        return tuple(sorted({*VARIANT_STAGES[variant], 3}))
    return STAGES if variant == "full" else VARIANT_STAGES[variant]


def scaled_steps(steps: int, fraction: float) -> int:
    return max(1, int(round(steps * fraction)))


def member_params(params: Params, variant: str, seed: int, alpha: Optional[float]) -> Params:
    """The main line's params with the member's variant, seed and alpha (``ablations.alpha`` for an
    ablation member), every stage's steps and warm-up scaled by ``ablations.steps_fraction``, and the
    ``ablations.eval`` keys over ``eval`` (ablation and sweep members alike)."""
    fraction = params.ablations.steps_fraction
    train = {}
    for k in STAGES:
        sp = getattr(params.train, f"stage{k}")
        train[f"stage{k}"] = {"steps": scaled_steps(sp.steps, fraction),
                              "warmup_steps": int(round(sp.warmup_steps * fraction))}
    overlay = {"variant": variant, "seed": seed, "alpha": params.ablations.alpha if alpha is None else alpha,
               "train": train, "eval": dict(params.ablations.eval)}
    return validate(deep_merge(params.model_dump(mode="json"), overlay), "ablation member")


def stage_folders(models: Path, out: Path, retrained: tuple[int, ...]) -> dict[int, Path]:
    """Where each stage's output is read from: the member's own folder or the main line's."""
    return {k: out / f"stage{k}" if k in retrained else models / f"stage{k}" for k in STAGES}


def pipeline_overrides(folders: dict[int, Path], models: Path) -> dict[str, Path]:
    """``mcdm.pipelines.loading.load_from_models_dir`` overrides: every component a retrained stage exports."""

    out = {}
    for component, (sub, _) in MODELS_LAYOUT.items():
        head, _, rest = sub.partition("/")
        for k, folder in folders.items():
            if head == f"stage{k}" and folder != models / head:
                out[component] = folder / rest
    return out


def run_member(params: Params, variant: Optional[str], seed: Optional[int], alpha: Optional[float],
               features: str | Path, models: str | Path, syncnet: Optional[str | Path], out: str | Path,
               reports: str | Path, samples: str | Path, checkpoints: str | Path, *, tracking: bool = True,
               progress: bool = True) -> dict:
    """Train the member's stages, evaluate it, write its metric files; returns its full metrics.

    ``params``: the main line's (params.yaml). ``variant`` / ``seed`` default to the main line's
    (a sweep member sweeps the main line's variant at its seed); ``alpha`` None makes an ablation
    member (at ``ablations.alpha``), a number a sweep member.
    """

    started = time.time()
    features, models, out, reports = Path(features), Path(models), Path(out), Path(reports)
    samples, checkpoints = Path(samples), Path(checkpoints)
    variant = params.variant if variant is None else variant
    seed = params.seed if seed is None else seed
    kind = member_kind(alpha)
    retrained = member_stages(variant, kind)
    mp = member_params(params, variant, seed, alpha)
    folders = stage_folders(models, out, retrained)
    taken = {"base": "base_models", "motion_encoders": "motion_encoders",
             **{f"stage{k}": f"train_stage{k}" for k in STAGES if k not in retrained}}
    for folder, stage in taken.items():  # the main line's outputs this member reads
        if not (models / folder).is_dir():
            raise MissingStageOutput(models / folder, stage)
    name = out.name
    train: dict[str, dict] = {}
    with mlflow_tracking.ablation_member(name, kind):
        for k in retrained:  # 1. the stages the variant changes, in order, each reading the previous ones
            inputs = StageInputs(features=features, base=models / "base", motion_encoders=models / "motion_encoders",
                                 prev=tuple(folders[j] for j in STAGES if j < k))
            result = run_stage(mp, k, inputs, folders[k], checkpoints / f"stage{k}", show_progress=progress)
            train[f"stage{k}"] = {key: result.get(key) for key in TRAIN_KEYS}
            print(f"{name}: stage {k} ({variant}, seed {seed}, alpha {mp.alpha}): {result.get('steps')} steps, "
                  f"{result.get('wall_s', 0):.0f} s")
        # 2. the pipeline from the member's stages and the main line's others, evaluated as `evaluate` does
        pipe = load_from_models_dir(models, mp, overrides=pipeline_overrides(folders, models))
        metrics = evaluate(features, models, syncnet, reports, samples, mp, pipe=pipe, progress=progress,
                           baselines=False)  # model-independent: the main line's evaluate measures them
        metrics["member"] = {
            "name": name, "kind": kind, "variant": variant, "seed": seed, "alpha": mp.alpha,
            "retrained_stages": list(retrained), "main_line_stages": [k for k in STAGES if k not in retrained],
            "steps_fraction": params.ablations.steps_fraction, "eval": dict(params.ablations.eval),
            "steps": {f"stage{k}": getattr(mp.train, f"stage{k}").steps for k in retrained},
            "train": train, "main_line_params_hash": params.hash(), "wall_s": round(time.time() - started, 2),
        }
        write_metric_files(metrics, reports)  # the headline again, the details now with the member block
        if tracking:
            files = (METRICS_JSON, DETAILS_JSON, FEATURES_NPZ, "eval_clips.csv", "eval_grid.png", "long_term.csv",
                     "long_term_windows.csv", "long_term.png")
            artifacts = [reports / f for f in files if (reports / f).is_file()] + [samples]
            done = track_evaluation(mp, headline(metrics), out, artifacts)
            print(f"{name}: mlflow run {done.get('run_id')}; {done.get('promotion', '')}")
    return metrics
