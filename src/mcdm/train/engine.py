"""One DeepSpeed engine for every training stage: set-up, the step loop, checkpoints and resume.

A stage builds its model (frozen parts with ``requires_grad=False``), a dataset and a
``loss_fn(engine, batch) -> loss``, and calls :func:`train_loop`. Everything else lives here:

* **Launch.** Under ``deepspeed --num_gpus N`` (or a hostfile, or ``--num_accelerators N`` on CPU)
  the launcher sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_*``. Started directly
  (``mcdm train_stage1``, ``dvc repro``) it runs as one process: we set those variables for the
  duration of the set-up (a free port on 127.0.0.1) and start a one-rank ``gloo`` group on CPU.
* **Config.** One JSON (``train.deepspeed_config``, default ``configs/deepspeed/zero2.json``: ZeRO-2,
  AdamW through ``torch_adam`` so no optimizer op is compiled). Its ``"auto"`` fields are filled at
  run time: batch sizes, lr, warm-up and clipping from the stage's params; ``bf16`` on a GPU that
  has it and fp32 on CPU (``train.precision: auto``; ``fp32`` / ``bf16`` force one); bucket sizes
  capped by the trainable size; ``overlap_comm`` on GPU only. Exports take the fp32 master weights.
* **Data.** :class:`~mcdm.train.data.StepBatchSampler`: ``batch_size`` is the *global* batch, split
  over the ranks without overlap; the data position of a checkpoint is its step.
* **Checkpoints.** Every ``checkpoint_every`` steps and at the last step, DeepSpeed writes
  ``<dir>/step_XXXXXXXX/`` (module without its frozen parameters, ZeRO optimizer partitions, LR
  scheduler, step counters); each rank adds its RNG states (python, numpy, torch, cuda) as JSON;
  then rank 0 writes ``mcdm_checkpoint.json`` (step, loss, variant, fingerprint, trainable shapes)
  and the ``latest`` file, each to a temporary name and renamed. A folder without that JSON was
  cut off by a kill and is ignored, so a SIGKILL at any moment leaves the previous checkpoint usable.
* **Resume.** The newest complete checkpoint is loaded (``resumed from step N``) unless
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

import base64
import contextlib
import functools
import hashlib
import json
import math
import os
import random
import resource
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from mcdm.errors import McdmError
from mcdm.train.data import StepBatchSampler, move_batch, step_loader

DEFAULT_DEEPSPEED_CONFIG = "configs/deepspeed/zero2.json"
CHECKPOINT_META = "mcdm_checkpoint.json"
TAG_PREFIX = "step_"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: params that change how long a stage runs or how it is watched, not where it goes: a checkpoint
#: made before such a change is still resumed
RESUMABLE_ACROSS = ("checkpoint_every", "keep_checkpoints", "steps")


class NonFiniteLoss(McdmError):
    """The loss (or gradient norm) became NaN / inf: the stage stops, keeping its last good checkpoint."""


class CheckpointMismatch(McdmError):
    """A checkpoint in the folder was made for another variant or other parameter shapes."""


# --------------------------------------------------------------------------------------------------
# What to train


@dataclass
class TrainSpec:
    """Everything the loop needs besides the model, the loss and the data."""

    name: str
    steps: int
    batch_size: int  # global batch, split over the ranks
    lr: float
    checkpoint_dir: Path
    checkpoint_every: int
    grad_clip: float = 1.0
    warmup_steps: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    deterministic: bool = True
    deepspeed_config: Path = Path(DEFAULT_DEEPSPEED_CONFIG)
    gradient_checkpointing: bool = False
    variant: str = "full"
    fingerprint: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 0
    precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp32

    def __post_init__(self) -> None:
        self.checkpoint_dir = Path(self.checkpoint_dir)
        self.deepspeed_config = Path(self.deepspeed_config)
        # compared with the JSON stored in checkpoints, so keep it in its JSON form
        self.fingerprint = json.loads(json.dumps(self.fingerprint, sort_keys=True, default=str))

    @classmethod
    def from_params(cls, params, stage: int, checkpoint_dir: str | Path, *, name: Optional[str] = None,
                    fingerprint: Optional[Mapping[str, Any]] = None) -> "TrainSpec":
        """The spec of ``train.stage<stage>``. The fingerprint covers the params (minus step counts and
        checkpoint cadence), the ``mcdm`` source code, and whatever the stage adds (e.g. its inputs'
        hash), so a checkpoint is resumed only by the run that made it."""
        sp = getattr(params.train, f"stage{stage}")
        dump = params.model_dump(mode="json")
        for key in ("tracking", "registry", "eval", "ablations", "sweep"):
            dump.pop(key, None)
        for key in RESUMABLE_ACROSS:
            dump["train"].pop(key, None)
            for k in (1, 2, 3):
                dump["train"][f"stage{k}"].pop(key, None)
        fp = {"params": _hash(dump), "code": code_fingerprint()}
        fp.update(fingerprint or {})
        return cls(
            name=name or f"train_stage{stage}", steps=sp.steps, batch_size=sp.batch_size, lr=sp.lr,
            grad_clip=sp.grad_clip, warmup_steps=sp.warmup_steps, checkpoint_dir=Path(checkpoint_dir),
            checkpoint_every=params.train.checkpoint_every, keep_checkpoints=params.train.keep_checkpoints,
            seed=params.seed, deterministic=params.train.deterministic,
            deepspeed_config=Path(params.train.deepspeed_config),
            gradient_checkpointing=params.model.gradient_checkpointing, variant=params.variant,
            fingerprint=fp, num_workers=params.train.num_workers, precision=params.train.precision,
        )


@dataclass
class TrainResult:
    engine: Any  # deepspeed.DeepSpeedEngine: .module, .device
    steps: int
    steps_run: int
    resumed_from: Optional[int]
    final_loss: float
    wall_s: float
    peak_memory_mb: float
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the ``mcdm`` package's Python sources (a code change must not resume an old run).
    Computed once per process: the code a process runs is the code it loaded at start."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Process set-up: accelerator, process group, determinism


def on_gpu() -> bool:
    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _single_process_env():
    """When no launcher started us, act as rank 0 of 1 while DeepSpeed sets up, then restore the
    environment (so processes we start later do not believe they were launched)."""
    if "RANK" in os.environ:
        missing = [k for k in LAUNCHER_VARS if k not in os.environ]
        if missing:
            raise McdmError(f"launched with RANK set but without {', '.join(missing)}")
        yield
        return
    saved = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_deepspeed():
    if not on_gpu():
        # choose DeepSpeed's CPU accelerator outright instead of letting it probe and warn
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not on_gpu():
        # gloo does the (rare) CPU collectives; without this DeepSpeed JIT-compiles its shared-memory
        # all-reduce op at start-up (minutes on 2 cores, and it needs a C++ toolchain)
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    return deepspeed


def init_distributed():
    """Start (once per process) the process group: gloo on CPU, the accelerator's backend on GPU."""
    deepspeed = _import_deepspeed()
    import torch.distributed as dist

    if not dist.is_initialized():
        with _single_process_env():
            deepspeed.init_distributed(dist_backend=None if on_gpu() else "gloo")
    return deepspeed


def set_determinism(deterministic: bool) -> None:
    if not deterministic:
        torch.use_deterministic_algorithms(False)
        return
    if on_gpu():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    # warn_only: an op without a deterministic kernel warns instead of killing a long run
    torch.use_deterministic_algorithms(True, warn_only=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, as JSON."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(state), gauss],
           "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
           "torch": _b64(torch.get_rng_state())}
    if on_gpu():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, st, gauss = state["python"]
    random.setstate((version, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and on_gpu():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def complete_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """(step, folder, meta) of every checkpoint whose writing finished, oldest first."""
    out = []
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return out
    for tag in root.glob(f"{TAG_PREFIX}*"):
        meta_path = tag / CHECKPOINT_META
        if not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            continue
        out.append((int(meta["step"]), tag, meta))
    return sorted(out, key=lambda item: item[0])


def trainable_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _shape(s: list[int]) -> str:
    return "(" + ", ".join(str(d) for d in s) + ("," if len(s) == 1 else "") + ")"


def check_compatible(meta: Mapping[str, Any], where: Path, model: torch.nn.Module, variant: str) -> None:
    """Refuse a checkpoint made for another variant or other trainable shapes, naming both."""
    ours, theirs = trainable_shapes(model), meta.get("trainable", {})
    ck_variant = meta.get("variant")
    diffs = [f"{n}: {_shape(theirs[n])} in the checkpoint vs {_shape(ours[n])} in this model"
             for n in ours if n in theirs and theirs[n] != ours[n]]
    only_ck = sorted(set(theirs) - set(ours))
    only_model = sorted(set(ours) - set(theirs))
    if only_ck:
        diffs.append(f"{len(only_ck)} checkpoint parameter(s) this model lacks, e.g. "
                     + ", ".join(f"{n} {_shape(theirs[n])}" for n in only_ck[:3]))
    if only_model:
        diffs.append(f"{len(only_model)} model parameter(s) the checkpoint lacks, e.g. "
                     + ", ".join(f"{n} {_shape(ours[n])}" for n in only_model[:3]))
    if not diffs and ck_variant == variant:
        return
    if not diffs:
        n = next(iter(ours), None)
        diffs.append("same shapes" + (f" (e.g. {n}: {_shape(ours[n])} in both)" if n else ""))
    raise CheckpointMismatch(
        f"refusing to resume from {where}: it was made for variant {ck_variant!r}, this run is variant "
        f"{variant!r}; " + "; ".join(diffs[:4])
        + f". Give this run its own checkpoint folder or delete {where.parent}")


def _checked_module_load(src: Mapping[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """Checkpoints leave out frozen parameters: everything else must match exactly."""
    result = dst.load_state_dict(src, strict=False)
    frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise CheckpointMismatch(f"checkpoint does not fit the model: missing {missing[:5]}, "
                                 f"unexpected {sorted(result.unexpected_keys)[:5]}")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(engine, spec: TrainSpec, step: int, loss: float, rank: int, world_size: int,
                    extra: Optional[Mapping[str, Any]] = None,
                    before_commit: Optional[Callable[[], None]] = None) -> Path:
    """All ranks call this. The folder counts only once rank 0 has renamed its meta file into it;
    ``before_commit`` runs (on every rank) just before, so what it adds belongs to the checkpoint."""
    root = spec.checkpoint_dir
    tag = tag_for(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tag, ignore_errors=True)  # a half-written try at the same step
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "data_step": step},
                           save_latest=False, exclude_frozen_parameters=True)
    _atomic_write_text(root / tag / f"rng_rank{rank}.json", json.dumps(rng_state()))
    if before_commit is not None:
        with preserved_rng():
            before_commit()
    _barrier()
    if rank == 0:
        meta = {"step": step, "loss": loss, "variant": spec.variant, "fingerprint": spec.fingerprint,
                "world_size": world_size, "global_batch": spec.batch_size, "data_step": step,
                "trainable": trainable_shapes(engine.module), "time": time.time(), **(extra or {})}
        _atomic_write_text(root / tag / CHECKPOINT_META, json.dumps(meta, indent=1))
        _atomic_write_text(root / "latest", tag)  # DeepSpeed's own pointer (zero_to_fp32.py reads it)
        done = complete_checkpoints(root)
        for _, old, _ in done[:-spec.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        newest = done[-1][0]
        for path in root.glob(f"{TAG_PREFIX}*"):
            if not (path / CHECKPOINT_META).exists() and path.name < tag_for(newest):
                shutil.rmtree(path, ignore_errors=True)
    _barrier()
    return root / tag


def _discard_checkpoints(paths: list[Path], root: Path, rank: int) -> None:
    if rank == 0:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
        left = complete_checkpoints(root)
        if left:
            _atomic_write_text(root / "latest", left[-1][1].name)
        else:
            (root / "latest").unlink(missing_ok=True)
    _barrier()


def resume(engine, spec: TrainSpec, rank: int, say: Callable[[str], None]) -> tuple[int, Optional[dict]]:
    """Load the newest usable checkpoint; return (the step it ends at, its meta) or (0, None)."""
    done = complete_checkpoints(spec.checkpoint_dir)
    if not done:
        return 0, None
    _, newest, newest_meta = done[-1]
    same_run = newest_meta.get("fingerprint") == spec.fingerprint
    if same_run or newest_meta.get("variant") != spec.variant:
        # another variant's folder, or this run's own checkpoint that no longer fits: never touch it
        check_compatible(newest_meta, newest, engine.module, spec.variant)
    if not same_run:
        theirs = newest_meta.get("fingerprint", {})
        changed = sorted(k for k in set(theirs) | set(spec.fingerprint) if theirs.get(k) != spec.fingerprint.get(k))
        say(f"{spec.name}: checkpoints in {spec.checkpoint_dir} were made with other {', '.join(changed)}; "
            "they cannot continue this run: discarded, starting at step 0")
        _discard_checkpoints([path for _, path, _ in done], spec.checkpoint_dir, rank)
        return 0, None
    beyond = [path for s, path, _ in done if s > spec.steps]
    if beyond:  # the step count was lowered: resume from a checkpoint inside it
        say(f"{spec.name}: {len(beyond)} checkpoint(s) past step {spec.steps} dropped")
        _discard_checkpoints(beyond, spec.checkpoint_dir, rank)
        done = [d for d in done if d[0] <= spec.steps]
        if not done:
            return 0, None
    step, where, meta = done[-1]
    load_path, client = engine.load_checkpoint(str(spec.checkpoint_dir), tag=where.name,
                                               custom_load_fn=_checked_module_load)
    if load_path is None or client.get("step") != step:
        raise McdmError(f"{where}: DeepSpeed could not load this checkpoint")
    rng_file = where / f"rng_rank{rank}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    else:  # resumed on more ranks than it was saved with: fresh, but still reproducible, streams
        seed_everything(spec.seed + rank + 1_000_003 * step)
    say(f"{spec.name}: resumed from step {step} ({where})")
    return step, meta


# --------------------------------------------------------------------------------------------------
# Export


def _fp32_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights with trainable parameters taken from the optimizer's fp32 master copy
    (a collective under ZeRO: every rank must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
             for k, v in module.state_dict().items()}
    for name, p in module.named_parameters():
        if p.requires_grad:
            master = safe_get_full_fp32_param(p)
            if master is not None:
                state[name] = master.detach().float().cpu().reshape(p.shape)
    return state


def export_pretrained(modules, out_dir: str | Path, *, rank: int = 0, fp32_master: bool = True) -> Path:
    """Write a diffusers ``save_pretrained`` folder (safetensors + config.json), or one subfolder per
    entry of a mapping, to ``<out>.tmp`` and rename it to ``out``. Call on every rank; rank 0 writes.

    With ``fp32_master`` the trainable weights come from DeepSpeed's fp32 master copy, so a bf16
    run exports full-precision weights."""
    out = Path(out_dir)
    items = modules.items() if isinstance(modules, Mapping) else [("", modules)]
    states = [(sub, m, _fp32_state_dict(m) if fp32_master else None) for sub, m in items]
    if rank != 0:
        _barrier()
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub, module, state in states:
        target = tmp / sub if sub else tmp
        to_save = module
        if state is not None and any(v.dtype != state[k].dtype for k, v in module.state_dict().items()):
            to_save = type(module).from_config(module.config)
            to_save.load_state_dict(state, strict=True)
        to_save.save_pretrained(target, safe_serialization=True)
    old = out.with_name(out.name + ".old.tmp")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return out


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
    with _single_process_env():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
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


@contextlib.contextmanager
def preserved_rng():
    """Run a side task (sampling a preview) without moving the training RNG streams."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
