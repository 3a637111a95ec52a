"""Deterministic, resumable data order for step-based training on any number of ranks.

Training runs for a number of optimizer steps, not epochs. Step ``s`` (0-based) takes one *global*
batch of ``B`` distinct samples; with ``W`` ranks, rank ``r`` gets its ``B / W`` slice of it, so the
ranks never see the same sample in a step and the global batch does not depend on ``W``::

    steps_per_epoch = n // B                        (the tail of each epoch that fills no batch is dropped)
    epoch, k        = divmod(s, steps_per_epoch)
    order(epoch)    = randperm(n, seed + epoch)     (DistributedSampler's seeding convention)
    global batch(s) = order(epoch)[k*B : (k+1)*B]
    rank r's slice  = global batch(s)[r*B/W : (r+1)*B/W]

The data position of a checkpoint is therefore just its step: a resumed run builds the sampler with
``start_step`` and sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mcdm.errors import McdmError


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's slice of the global batch for steps ``start_step .. steps - 1``."""

    def __init__(self, dataset_size: int, global_batch: int, steps: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, start_step: int = 0, shuffle: bool = True):
        if global_batch % world_size:
            raise McdmError(f"batch size {global_batch} is not divisible by the {world_size} ranks")
        if dataset_size < global_batch:
            raise McdmError(f"the dataset has {dataset_size} samples, fewer than one batch of {global_batch}")
        self.n = dataset_size
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.steps = steps
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self.shuffle = shuffle
        self.steps_per_epoch = dataset_size // global_batch
        self._cached: tuple[int, torch.Tensor] | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of sample indices of one epoch (same seed + epoch rule as DistributedSampler)."""
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            else:
                order = torch.arange(self.n)
            self._cached = (epoch, order)
        return self._cached[1]

    def global_batch_indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[k * self.global_batch:(k + 1) * self.global_batch].tolist()

    def rank_indices(self, step: int) -> list[int]:
        lo = self.rank * self.per_rank
        return self.global_batch_indices(step)[lo:lo + self.per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            yield self.rank_indices(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


def step_loader(dataset: Dataset, sampler: StepBatchSampler, *, num_workers: int = 0,
                collate_fn=None) -> DataLoader:
    """A DataLoader over ``sampler`` whose own seed comes from a private generator, so creating it
    never draws from the global torch RNG (which a checkpoint restores)."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(sampler.seed),
                      persistent_workers=False)


def move_batch(batch: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor of a (nested) batch to ``device``; floating tensors are cast to ``dtype``
    (the engine's compute dtype: bf16 on GPU, fp32 on CPU) when it is given."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype, non_blocking=True)
        return batch.to(device=device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return type(batch)(move_batch(v, device, dtype) for v in batch) if isinstance(batch, tuple) \
            else [move_batch(v, device, dtype) for v in batch]
    return batch
