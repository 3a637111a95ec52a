"""The stages' diffusion losses (module docstring of :mod:`mcdm.train.stages`)."""
from __future__ import annotations

import torch

from mcdm.models.denoiser import MCDMDenoiser
from mcdm.models.diffusion_objective import denoising_mse
from mcdm.models.frame_noise import frame_correlated_noise


def stratified_timesteps(n: int, num_train_timesteps: int, device) -> torch.Tensor:
    """n timesteps, each marginally uniform on {0 .. T-1}, jointly one per stratum of width T / n:
    t_i = floor(T * ((u + i / n) mod 1)), u ~ U[0, 1) (the low-discrepancy sampler of Kingma et al.
    2021, Variational Diffusion Models). Same expected loss, much less variance between steps, so
    the loss curve shows the training rather than which timesteps a step happened to draw."""
    u = torch.rand((), device=device)
    frac = (u + torch.randperm(n, device=device) / n) % 1.0  # strata in random order over the items
    return (frac * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)


def diffusion_mse(denoiser: MCDMDenoiser, scheduler, z0: torch.Tensor, t: torch.Tensor, memory=None,
                  rho: float = 0.0, **cond):
    """Eq. of the module docstring for one clip per item at timesteps ``t`` (B,), the clip's frames'
    noise correlated by ``rho`` (models/frame_noise.py); returns (the MSE against the scheduler's
    target, the MTA memory state the clip leaves)."""
    eps = frame_correlated_noise(z0.shape, rho, device=z0.device, dtype=z0.dtype)
    z_t = scheduler.add_noise(z0, eps, t)  # z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps
    out = denoiser(z_t, t, memory_state=memory, **cond)
    return denoising_mse(scheduler, out.sample, z0, eps, t), out.memory_state


def keep_mask(batch: int, p_drop: float, device) -> torch.Tensor:
    """(B,) True where an item keeps its landmark clip (each whole clip dropped with ``p_drop``)."""
    return torch.rand(batch, device=device) >= p_drop
