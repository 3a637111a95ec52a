"""Checkpoints and resume (see :mod:`mcdm.train.engine`): ``<dir>/step_XXXXXXXX/`` written by
DeepSpeed plus our RNG states and ``mcdm_checkpoint.json`` (written last: a folder without it was cut
off by a kill and is ignored); the newest complete one is resumed unless it belongs to another model."""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from mcdm.errors import McdmError
from mcdm.train.distributed import barrier
from mcdm.train.reproducibility import preserved_rng, rng_state, seed_everything, set_rng_state
from mcdm.train.spec import TrainSpec

CHECKPOINT_META = "mcdm_checkpoint.json"
TAG_PREFIX = "step_"


#: params that change how long a stage runs or how it is watched, not where it goes: a checkpoint
#: made before such a change is still resumed


class CheckpointMismatch(McdmError):
    """A checkpoint in the folder was made for another variant or other parameter shapes."""


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
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "data_step": step},
                           save_latest=False, exclude_frozen_parameters=True)
    _atomic_write_text(root / tag / f"rng_rank{rank}.json", json.dumps(rng_state()))
    if before_commit is not None:
        with preserved_rng():
            before_commit()
    barrier()
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
    barrier()
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
    barrier()


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
