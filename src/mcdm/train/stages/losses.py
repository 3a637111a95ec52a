"""The stages' diffusion losses (module docstring of :mod:`mcdm.train.stages`). Their random draws
come from the step's :class:`~mcdm.train.step_random.StepRandom`, so a global batch trains the same on
any number of ranks."""
from __future__ import annotations

import torch

from mcdm.models.denoiser import MCDMDenoiser
from mcdm.models.diffusion_objective import denoising_mse
from mcdm.train.step_random import StepRandom


def diffusion_mse(denoiser: MCDMDenoiser, scheduler, z0: torch.Tensor, t: torch.Tensor, memory=None,
                  rho: float = 0.0, random: StepRandom | None = None, **cond):
    """Eq. of the module docstring for one clip per item at timesteps ``t`` (B,), the clip's frames'
    noise correlated by ``rho`` (models/frame_noise.py); returns (the MSE against the scheduler's
    target, the MTA memory state the clip leaves). ``random``: the step's draws (default: the global RNG)."""
    random = random or StepRandom.unseeded(z0.shape[0])
    eps = random.frame_noise(z0.shape[1:], rho, device=z0.device, dtype=z0.dtype)
    z_t = scheduler.add_noise(z0, eps, t)  # z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps
    out = denoiser(z_t, t, memory_state=memory, **cond)
    return denoising_mse(scheduler, out.sample, z0, eps, t), out.memory_state


def keep_mask(random: StepRandom, p_drop: float, device) -> torch.Tensor:
    """(B,) True where an item keeps its landmark clip (each whole clip dropped with ``p_drop``)."""
    return random.uniform(device) >= p_drop
