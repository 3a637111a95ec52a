"""What the training loop needs besides the model, the loss and the data (:class:`TrainSpec`, built
from a stage's params), and what it returns."""
from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mcdm.config import TrainParams

# which spec fields a checkpoint may be resumed across (a longer run continues a shorter one)
RESUMABLE_ACROSS = ("checkpoint_every", "keep_checkpoints", "steps")


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
    deepspeed_config: Path = Path(TrainParams.model_fields["deepspeed_config"].default)
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
        fp = {"params": stable_hash(dump), "code": code_fingerprint()}
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


def stable_hash(obj: Any) -> str:
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
