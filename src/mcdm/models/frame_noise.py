"""The diffusion noise of a clip: frames share part of it (the mixed noise model).

Ge et al. 2023, "Preserve Your Own Correlation: A Noise Prior for Video Diffusion Models" (PYoCo,
ICCV): the frames of a video are close, so their diffusion noise need not be independent. The mixed
model draws one shared field per clip and one per frame,

    eps_f = sqrt(rho) * eps_shared + sqrt(1 - rho) * eps_f^ind,      eps_shared, eps_f^ind ~ N(0, I)

so every frame's noise is still N(0, I) (the schedule, the losses and the samplers are unchanged)
while any two frames of a clip correlate with coefficient ``rho`` (``model.frame_noise_correlation``).
``rho = 0`` is the usual independent noise, ``rho = 1`` the same field for every frame.

Training (stages 1 and 3) and generation draw from the same model: at generation the initial latents
of every clip are drawn this way (DDIM with eta = 0 adds no other noise). Independent per-frame noise
at the embedded scale gives frames that flicker against each other: a measured 6x the ground truth's
frame-to-frame pixel change, which the FVD fallback reads as motion (README, "Frame-correlated noise").
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.utils.torch_utils import randn_tensor

from mcdm.errors import McdmError


def frame_correlated_noise(
    shape: tuple[int, ...],
    rho: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    frame_dim: int = 2,
) -> torch.Tensor:
    """Noise of ``shape`` (B, C, F, h, w by default) whose frames along ``frame_dim`` correlate with
    coefficient ``rho`` in [0, 1]; unit variance per element. ``rho = 0`` draws exactly what
    ``randn_tensor(shape, generator)`` draws."""
    rho = float(rho)
    if not 0.0 <= rho <= 1.0:
        raise McdmError(f"frame noise correlation must be in [0, 1] (got {rho})")
    independent = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
    if rho == 0.0:
        return independent
    shared_shape = list(shape)
    shared_shape[frame_dim] = 1
    shared = randn_tensor(tuple(shared_shape), generator=generator, device=device, dtype=dtype)
    # eps_f = sqrt(rho) eps_shared + sqrt(1 - rho) eps_f^ind
    return rho ** 0.5 * shared + (1.0 - rho) ** 0.5 * independent
