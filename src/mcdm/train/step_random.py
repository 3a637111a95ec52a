"""The random draws of one training step, the same whatever the number of ranks sharing its batch.

A global batch of B samples split over W ranks (:class:`~mcdm.train.data.StepBatchSampler`) trains
like one process on the same B samples only if every sample gets the same noise, timestep and
landmark drop in both cases. Drawing them from each rank's own RNG does not give that: rank r would
draw for its B / W samples what one process draws for the first B / W. So the loop hands every
step a :class:`StepRandom` (in the batch, under :data:`STEP_RANDOM`):

* per-sample streams: sample p of the global batch of step s draws from a generator seeded by
  ``(seed, s, p)``, whichever rank holds it (noise, uniforms);
* per-step draws shared by all ranks (the stratified timesteps' offset and permutation over the
  global batch, ``(seed, s)``), of which each rank takes its samples' entries.

Without one (a loss called outside the loop: previews, tests) the same calls draw from the global
RNG (:meth:`StepRandom.unseeded`). The generators live on the CPU; draws are moved to the device.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Optional

import torch

from mcdm.models.frame_noise import frame_correlated_noise

#: the batch key under which :func:`mcdm.train.engine.train_loop` puts the step's :class:`StepRandom`
STEP_RANDOM = "step_random"


def _seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (a hash: neighbouring steps and samples get unrelated streams)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class StepRandom:
    """Random draws for ``positions`` (this rank's samples' places in the global batch of ``global_batch``)."""

    def __init__(self, seed: Optional[int], step: int, positions: Sequence[int], global_batch: int):
        self.positions = list(positions)
        self.global_batch = global_batch
        if seed is None:  # the global RNG
            self.per_sample: list[Optional[torch.Generator]] = [None] * len(self.positions)
            self.shared: Optional[torch.Generator] = None
        else:
            self.per_sample = [torch.Generator().manual_seed(_seed(seed, step, p)) for p in self.positions]
            self.shared = torch.Generator().manual_seed(_seed(seed, step, "step"))

    @classmethod
    def for_rank(cls, seed: int, step: int, rank: int, world_size: int, global_batch: int) -> "StepRandom":
        per_rank = global_batch // world_size
        return cls(seed, step, range(rank * per_rank, (rank + 1) * per_rank), global_batch)

    @classmethod
    def unseeded(cls, batch_size: int) -> "StepRandom":
        """Draws from the global RNG for a batch of ``batch_size`` (a loss called outside the loop)."""
        return cls(None, 0, range(batch_size), batch_size)

    @classmethod
    def of(cls, batch: dict, batch_size: int) -> "StepRandom":
        """The step's draws the loop put in ``batch``, else the global RNG's."""
        found = batch.get(STEP_RANDOM) if isinstance(batch, dict) else None
        return found if found is not None else cls.unseeded(batch_size)

    def __len__(self) -> int:
        return len(self.positions)

    def uniform(self, device=None) -> torch.Tensor:
        """(b,) one U[0, 1) per sample."""
        return torch.cat([torch.rand(1, generator=g) for g in self.per_sample]).to(device)

    def frame_noise(self, shape: Sequence[int], rho: float, device=None, dtype=None) -> torch.Tensor:
        """(b, *shape) N(0, I) noise per sample whose frames (``shape[1]``) correlate by ``rho``
        (:func:`~mcdm.models.frame_noise.frame_correlated_noise`)."""
        noise = [frame_correlated_noise(tuple(shape), rho, generator=g, frame_dim=1) for g in self.per_sample]
        return torch.stack(noise).to(device=device, dtype=dtype)

    def stratified_timesteps(self, num_train_timesteps: int, per_sample: int = 1, device=None) -> torch.Tensor:
        """(per_sample, b) timesteps, each marginally uniform on {0 .. T-1}, jointly one per stratum
        of width T / n over the n = per_sample x global_batch clips of the step:
        t = floor(T ((u + perm_j / n) mod 1)) for clip j = k x global_batch + position (Kingma et al.
        2021, Variational Diffusion Models: the same expected loss with less variance between steps)."""
        n = per_sample * self.global_batch
        u = torch.rand((), generator=self.shared)
        perm = torch.randperm(n, generator=self.shared)
        index = torch.tensor([[k * self.global_batch + p for p in self.positions] for k in range(per_sample)])
        frac = (u + perm[index] / n) % 1.0
        return (frac * num_train_timesteps).long().clamp(max=num_train_timesteps - 1).to(device)
