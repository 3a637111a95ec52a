"""One DeepSpeed engine for every training stage: set-up, the step loop, checkpoints and resume.

A stage builds its model (frozen parts with ``requires_grad=False``), a dataset and a
``loss_fn(engine, batch) -> loss``, and calls :func:`train_loop`. Everything else lives here:

* **Launch.** Under ``deepspeed --num_gpus N`` (or a hostfile, or ``--num_accelerators N`` on CPU)
  the launcher sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_*``; a launched rank stops
  when its launcher is killed (:mod:`mcdm.train.launcher_watch`). Started directly
  (``mcdm train --stage 1``, ``dvc repro``) it runs as one process: we set ``RANK`` / ``WORLD_SIZE`` /
  ``LOCAL_RANK`` for the duration of the set-up and start a one-rank group on an in-memory store,
  listening on no port (:mod:`mcdm.train.distributed`).
* **Config.** One JSON (``train.deepspeed_config``, default ``configs/deepspeed/zero2.json``: ZeRO-2,
  AdamW through ``torch_adam`` so no optimizer op is compiled). Its ``"auto"`` fields are filled at
  run time: batch sizes, lr, warm-up and clipping from the stage's params; ``bf16`` on a GPU that
  has it and fp32 on CPU (``train.precision: auto``; ``fp32`` / ``bf16`` force one); bucket sizes
  capped by the trainable size; ``overlap_comm`` on GPU only. Exports take the fp32 master weights.
* **Data.** :class:`~mcdm.train.data.StepBatchSampler`: ``batch_size`` is the *global* batch, split
  over the ranks without overlap; the data position of a checkpoint is its step. A dict batch also
  carries the step's :class:`~mcdm.train.step_random.StepRandom` (key ``step_random``): noise and
  timesteps drawn by the sample's place in the global batch, so a stage trains the same numbers on
  1 or N ranks (up to the order of the gradient sums).
* **Checkpoints.** Every ``checkpoint_every`` steps and at the last step, DeepSpeed writes
  ``<dir>/step_XXXXXXXX/`` (module without its frozen parameters, ZeRO optimizer partitions, LR
  scheduler, step counters); each rank adds its RNG states (python, numpy, torch, cuda) as JSON;
  then rank 0 writes ``mcdm_checkpoint.json`` (step, loss, variant, fingerprint, trainable shapes)
  and the ``latest`` file, each to a temporary name and renamed. A folder without that JSON was
  cut off by a kill and is ignored, so a SIGKILL at any moment leaves the previous checkpoint usable.
* **Resume.** The newest complete checkpoint is loaded (``resumed from step N``), with
  ``torch.load(weights_only=True)`` and an allow-list of DeepSpeed's classes (:mod:`mcdm.train.safe_checkpoint`), unless
  - it was made for another variant, or by this very run (same fingerprint) but its trainable
    shapes differ from the model's: refused, naming both variants and both shapes (the folder
    belongs to another model; nothing is deleted);
  - its fingerprint (params, code, anything the stage adds) differs: it cannot continue this run,
    so it is discarded with a message and training starts at step 0 (e.g. after
    ``dvc exp run -S train.stage1.lr=...``: the checkpoint folder is not a DVC output, so it outlives the run);
  - it lies past ``steps`` (the step count was lowered): dropped, the newest one within is used.
  A higher step count continues the run (steps are not part of the fingerprint).
* **Non-finite loss** (or gradient norm): the stage stops with the step number; no checkpoint is
  written after the last good one.
* **Determinism.** ``train.deterministic``: ``torch.use_deterministic_algorithms(True,
  warn_only=True)`` and fixed seeds; on CPU a killed-and-resumed run ends bitwise equal to an
  uninterrupted one (tested).
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from mcdm.errors import McdmError
from mcdm.train.checkpoints import resume, save_checkpoint
from mcdm.train.data import StepBatchSampler, move_batch, step_loader
from mcdm.train.distributed import init_distributed, on_gpu, single_process_env
from mcdm.train.reproducibility import seed_everything, set_determinism
from mcdm.train.safe_checkpoint import load_safely
from mcdm.train.spec import TrainResult, TrainSpec
from mcdm.train.step_random import STEP_RANDOM, StepRandom


class NonFiniteLoss(McdmError):
    """The loss (or gradient norm) became NaN / inf: the stage stops, keeping its last good checkpoint."""


# --------------------------------------------------------------------------------------------------
# What to train


# --------------------------------------------------------------------------------------------------
# Process set-up: accelerator, process group, determinism


# --------------------------------------------------------------------------------------------------
# DeepSpeed config


def resolve_deepspeed_config(path: str | Path, spec: TrainSpec, world_size: int,
                             trainable_numel: int = 50_000_000) -> dict[str, Any]:
    """Read the JSON and fill its ``"auto"`` fields for this stage, device and world size.

    Bucket sizes are capped by the number of trainable elements: ZeRO allocates a bucket per step,
    and a 50M-element bucket for a tiny CPU model costs far more than the step itself."""
    path = Path(path)
    if not path.is_file():
        raise McdmError(f"train.deepspeed_config: {path} not found")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise McdmError(f"{path}: not valid JSON ({err})") from None
    if spec.batch_size % world_size:
        raise McdmError(f"batch_size {spec.batch_size} is not divisible by the {world_size} ranks")
    accumulation = config.get("gradient_accumulation_steps", 1)
    if accumulation in ("auto", None):
        accumulation = 1
    if spec.batch_size % (world_size * accumulation):
        raise McdmError(f"batch_size {spec.batch_size} is not divisible by {world_size} ranks x "
                        f"{accumulation} accumulation steps")
    if accumulation != 1:
        raise McdmError(f"{path}: gradient_accumulation_steps must be 1 (one loader batch per step)")
    from deepspeed.accelerator import get_accelerator

    if spec.precision not in ("auto", "fp32", "bf16"):
        raise McdmError(f"train.precision: unknown precision {spec.precision!r} (auto, fp32, bf16)")
    bf16 = spec.precision == "bf16" or (spec.precision == "auto" and on_gpu() and get_accelerator().is_bf16_supported())
    bucket = int(min(50_000_000, max(trainable_numel, 100_000)))
    auto = {
        "train_batch_size": spec.batch_size,
        "train_micro_batch_size_per_gpu": spec.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": spec.grad_clip,
        "optimizer.params.lr": spec.lr,
        "scheduler.params.warmup_max_lr": spec.lr,
        "scheduler.params.warmup_min_lr": 0.0 if spec.warmup_steps else spec.lr,
        "scheduler.params.warmup_num_steps": max(1, spec.warmup_steps),
        "zero_optimization.overlap_comm": on_gpu(),
        "zero_optimization.reduce_bucket_size": bucket,
        "zero_optimization.allgather_bucket_size": bucket,
        "bf16.enabled": bf16,
        "fp16.enabled": False,
    }

    def fill(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, f"{key}.{k}" if key else k) for k, v in node.items()}
        if node == "auto":
            if key not in auto:
                raise McdmError(f"{path}: no run-time value for \"auto\" at {key}")
            return auto[key]
        return node

    return fill(config, "")


# --------------------------------------------------------------------------------------------------
# Checkpoints


# --------------------------------------------------------------------------------------------------
# Export


# --------------------------------------------------------------------------------------------------
# The loop


def _enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    from diffusers import ModelMixin

    count = 0
    for m in model.modules():
        if isinstance(m, ModelMixin) and getattr(m, "_supports_gradient_checkpointing", False):
            m.enable_gradient_checkpointing()
            count += 1
    return count


def peak_memory_mb() -> tuple[float, str]:
    if on_gpu():
        return torch.cuda.max_memory_allocated() / 2**20, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "RSS"


def _finite_mean(loss: torch.Tensor, world_size: int) -> tuple[float, bool]:
    """Mean loss over ranks and whether every rank's loss is finite (one small all-reduce)."""
    value = loss.detach().float()
    finite = torch.isfinite(value)
    if world_size == 1:
        return float(value), bool(finite)
    import torch.distributed as dist

    buf = torch.stack([torch.where(finite, value, torch.zeros_like(value)),
                       (~finite).float()]).to(loss.device)
    dist.all_reduce(buf)
    return float(buf[0]) / world_size, float(buf[1]) == 0


def train_loop(model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], dataset,
               spec: TrainSpec, *, tracker=None, collate_fn=None,
               on_checkpoint: Optional[Callable[[Any, int], None]] = None) -> TrainResult:
    """Train ``model``'s parameters that require grad for ``spec.steps`` steps (resuming if a
    checkpoint exists). ``loss_fn(engine, batch)`` gets the DeepSpeed engine (call it like the model;
    ``engine.module`` is the model) and the batch on ``engine.device`` in the compute dtype.
    ``tracker`` (:mod:`mcdm.tracking.runs`) receives loss / lr / grad_norm / samples_per_s per step.
    ``on_checkpoint(engine, step)`` runs on every rank each time DeepSpeed has written a
    checkpoint's files, before the checkpoint is marked complete: files it adds to
    ``checkpoint_dir / tag_for(step)`` belong to that checkpoint (a kill before the end leaves the
    previous one in use). The training RNG streams are saved around it, so sampling a preview
    there does not change the training."""
    started = time.time()
    deepspeed = init_distributed()
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)
    set_determinism(spec.deterministic)
    seed_everything(spec.seed + rank)
    if spec.gradient_checkpointing and not _enable_gradient_checkpointing(model):
        warnings.warn(f"{spec.name}: gradient checkpointing asked for, but no submodule supports it",
                      stacklevel=2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise McdmError(f"{spec.name}: the model has no trainable parameters")
    config = resolve_deepspeed_config(spec.deepspeed_config, spec, world_size,
                                      trainable_numel=sum(p.numel() for p in trainable))
    with single_process_env():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    load_safely(engine)  # resume unpickles no code (safe_checkpoint.py)
    dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32

    start, meta = resume(engine, spec, rank, say)
    if tracker is not None and meta:
        tracker.resumed(start, meta.get("tracking_run"))
    sampler = StepBatchSampler(len(dataset), spec.batch_size, spec.steps, rank=rank,
                               world_size=world_size, seed=spec.seed, start_step=start)
    loader = step_loader(dataset, sampler, num_workers=spec.num_workers, collate_fn=collate_fn)
    last_loss = float(meta["loss"]) if meta else float("nan")
    last_good = start if meta else None
    bar = tqdm(total=spec.steps, initial=start, desc=spec.name, disable=rank != 0, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr)
    step = start
    for step_index, batch in enumerate(loader, start=start):
        step = step_index + 1
        t0 = time.perf_counter()
        batch = move_batch(batch, engine.device, dtype)
        if isinstance(batch, dict):  # this step's draws, by place in the global batch (step_random.py)
            batch[STEP_RANDOM] = StepRandom.for_rank(spec.seed, step_index, rank, world_size, spec.batch_size)
        loss = loss_fn(engine, batch)
        mean_loss, finite = _finite_mean(loss, world_size)
        if not finite:
            bar.close()
            mine = loss.detach().float().item()
            value = mine if not math.isfinite(mine) else "non-finite on another rank"
            raise NonFiniteLoss(_stop_message(spec, "loss", value, step, last_good))
        engine.backward(loss)
        engine.step()
        metrics = {"loss": mean_loss, "lr": float(engine.get_lr()[0])}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
            if not math.isfinite(metrics["grad_norm"]):
                bar.close()
                raise NonFiniteLoss(_stop_message(spec, "gradient norm", metrics["grad_norm"], step, last_good))
        dt = time.perf_counter() - t0
        last_loss = mean_loss
        samples_per_s = metrics["samples_per_s"] = spec.batch_size / max(dt, 1e-9)
        if tracker is not None:
            tracker.log_metrics(metrics, step=step)
        bar.set_postfix({"loss": f"{mean_loss:.4f}", "samples/s": f"{samples_per_s:.1f}"}, refresh=False)
        bar.update(1)
        if step % spec.checkpoint_every == 0 or step == spec.steps:
            save_checkpoint(engine, spec, step, mean_loss, rank, world_size,
                            extra={"tracking_run": getattr(tracker, "run_id", None)},
                            before_commit=(lambda: on_checkpoint(engine, step)) if on_checkpoint else None)
            last_good = step
    bar.close()
    wall = time.time() - started
    peak, kind = peak_memory_mb()
    result = TrainResult(engine=engine, steps=step, steps_run=step - start,
                         resumed_from=start if meta else None, final_loss=last_loss, wall_s=wall,
                         peak_memory_mb=peak, rank=rank, world_size=world_size)
    say(f"{spec.name}: {step} steps ({step - start} this run, {world_size} rank(s)), final loss "
        f"{last_loss:.4g}, wall time {wall:.1f} s, peak memory {peak:.0f} MiB ({kind})")
    if tracker is not None:
        tracker.log_metrics({"final_loss": last_loss, "wall_time_s": wall, "peak_memory_mb": peak}, step=step)
    return result


def _stop_message(spec: TrainSpec, what: str, value: float | str, step: int, last_good: Optional[int]) -> str:
    kept = (f"the last good checkpoint is step {last_good} in {spec.checkpoint_dir}" if last_good
            else "no checkpoint was written yet")
    return f"{spec.name}: {what} is {value} at step {step}; stopped ({kept})"


