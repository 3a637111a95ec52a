"""A training stage as a task: what it builds, trains, measures and exports."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from mcdm.config import Params
from mcdm.train.datasets import ClipRuns, FeatureSet
from mcdm.train.stages.inputs import StageInputs

EVAL_ITEMS, EVAL_TIMESTEP_BINS, EVAL_SEED = 8, 4, 1234  # the fixed-batch loss (before / after training)


class StageModel(nn.Module):
    """Every module a stage uses (trained and frozen) under one root, which DeepSpeed wraps;
    ``forward(batch)`` is the stage's loss, so ``engine(batch)`` runs it."""

    def __init__(self, parts: dict[str, nn.Module], loss: Callable[[dict], torch.Tensor]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self._loss = loss

    def forward(self, batch: dict) -> torch.Tensor:
        return self._loss(batch)


class StageTask:
    """What one stage trains and how. Subclasses set ``stage`` and fill ``parts`` (the modules),
    ``dataset``, ``fingerprint``; ``model`` is the :class:`StageModel` DeepSpeed wraps."""

    stage: int = 0
    precision: Optional[str] = None  # forces train.precision (None: from params)
    trains: bool = True  # False: the stage only fits statistics and exports

    def __init__(self, params: Params, inputs: StageInputs, show_progress: bool = True):
        self.params = params
        self.inputs = inputs
        self.show_progress = show_progress
        self.parts: dict[str, nn.Module] = {}
        self.dataset: Optional[ClipRuns] = None
        self.features: Optional[FeatureSet] = None
        self.fingerprint: dict[str, str] = {}
        self.samples_per_item = 1
        self.model: Optional[StageModel] = None

    @classmethod
    def build(cls, params: Params, inputs: StageInputs, show_progress: bool = True) -> "StageTask":
        task = cls(params, inputs, show_progress)
        torch.manual_seed(params.seed)  # new layers' initialisation
        task.setup()
        task.model = StageModel(task.parts, task.loss)
        return task

    def setup(self) -> None:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def trainable(self) -> list[str]:
        """Names (under ``model``) of the parameters this stage trains."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def export_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def preview(self, out_dir: Path) -> Optional[Path]:
        """A picture of what the stage learned (rank 0, after training), or None."""
        return None

    def fixed_batch_loss(self) -> Optional[float]:
        """The loss on a fixed batch with fixed noise (see ``DenoiserStage.fixed_batch_loss``)."""
        return None

    def stage_info(self) -> dict:
        return {}
