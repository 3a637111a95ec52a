"""One entry point for the three stages: build the task, train it through the engine, export, record."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mcdm.config import Params
from mcdm.errors import McdmError
from mcdm.media.files import write_json
from mcdm.pipelines.pyfunc import log_pyfunc
from mcdm.tracking.runs import is_main_line, register_stage_model, stage_run
from mcdm.train.engine import peak_memory_mb, train_loop
from mcdm.train.spec import TrainSpec
from mcdm.train.stages.denoiser_stages import Stage1, Stage3
from mcdm.train.stages.export import export_stage, registry_bundle
from mcdm.train.stages.inputs import StageInputs, stage_name
from mcdm.train.stages.prior_stage import Stage2
from mcdm.train.stages.recorder import StepRecorder, loss_summary, write_loss_csv
from mcdm.train.stages.task import StageTask

TASKS: dict[int, type[StageTask]] = {1: Stage1, 2: Stage2, 3: Stage3}


def build_task(params: Params, stage: int, inputs: StageInputs, show_progress: bool = True) -> StageTask:
    if stage not in TASKS:
        raise McdmError(f"--stage: must be 1, 2 or 3 (got {stage})")
    return TASKS[stage].build(params, inputs, show_progress)


def stage_spec(task: StageTask, checkpoint_dir: str | Path):
    """The :class:`~mcdm.train.engine.TrainSpec` of ``task``'s stage: ``train.stage<k>``, the task's
    fingerprint, and the task's own precision where it forces one (stage 2 trains in fp32)."""

    spec = TrainSpec.from_params(task.params, task.stage, checkpoint_dir, fingerprint=task.fingerprint)
    if task.precision:
        spec.precision = task.precision
    return spec


def run_stage(params: Params, stage: int, inputs: StageInputs, out_dir: str | Path, checkpoint_dir: str | Path,
              metrics_path: Optional[str | Path] = None, loss_csv: Optional[str | Path] = None, *,
              task: Optional[StageTask] = None, show_progress: bool = True) -> dict:
    """Train stage ``stage`` (resuming from ``checkpoint_dir``), export to ``out_dir``, write the
    metrics JSON and the loss-curve CSV, and log it all to the stage's MLflow run."""
    import tempfile


    started = time.time()
    torch.set_num_threads(params.train.threads)
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    task = task or build_task(params, stage, inputs, show_progress)
    spec = stage_spec(task, checkpoint_dir)
    trained = [p for p in task.model.parameters() if p.requires_grad]
    ema = None
    if params.train.ema and task.trains:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trained, decay=params.train.ema_decay)  # decay min(d, (1 + n) / (10 + n))
    metrics: dict[str, Any] = {"stage": stage, "variant": params.variant}
    eval_start = task.fixed_batch_loss()
    with stage_run(params, stage_name(stage), tags={"train_stage": stage}) as tracker:
        recorder = StepRecorder(tracker, checkpoint_dir, ema, trained)
        rank, result = 0, None
        if task.trains:
            result = train_loop(task.model, lambda engine, batch: engine(batch), task.dataset, spec,
                                tracker=recorder, on_checkpoint=recorder.on_checkpoint)
            rank = result.rank
        summary = loss_summary(recorder.rows)
        export_stage(task, out_dir, rank, {"steps": result.steps if result else 0,
                                           "final_loss": result.final_loss if result else None}, ema)
        if rank != 0:
            return {**metrics, "rank": rank}  # rank 0 alone writes the metrics, curves and MLflow records
        speed = float(np.median(recorder.speeds)) if recorder.speeds else None
        eval_end = task.fixed_batch_loss()
        metrics.update({
            **summary,
            "fixed_batch_loss_start": eval_start,
            "fixed_batch_loss_end": eval_end,
            "fixed_batch_loss_fell": None if eval_start is None else bool(eval_end < eval_start),
            "steps": result.steps if result else 0,
            "steps_run": result.steps_run if result else 0,
            "resumed_from": result.resumed_from if result else None,
            "final_loss": result.final_loss if result else None,
            "batch_size": spec.batch_size,
            "samples_per_s": speed,
            "clips_per_s": speed * task.samples_per_item if speed else None,
            "train_wall_s": round(result.wall_s, 2) if result else 0.0,
            "wall_s": round(time.time() - started, 2),
            "peak_rss_mb": round(peak_memory_mb()[0], 1),
            "device": str(result.engine.device) if result else "cpu",
            "trainable_parameters": sum(p.numel() for p in trained) if task.trains else 0,
            "ema": ema is not None,
        })
        if metrics_path is not None:
            write_json(metrics, Path(metrics_path))
        if loss_csv is not None:
            write_loss_csv(recorder.rows, Path(loss_csv))
            tracker.log_artifact(loss_csv, "curves")
        tracker.log_metrics({k: float(v) for k, v in metrics.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
                             and math.isfinite(float(v))}, step=metrics["steps"])
        with tempfile.TemporaryDirectory(prefix="mcdm-preview-") as tmp:
            picture = task.preview(Path(tmp)) if task.trains else None
            if picture is not None:
                tracker.log_artifact(picture, "samples")
            if stage == 3 and is_main_line(params):
                bundle = registry_bundle(task, out_dir, Path(tmp) / "mcdm")
                version = register_stage_model(tracker, params, bundle, log_pyfunc)
                if version is not None:
                    metrics["registered_version"] = version
    return metrics
