"""What the denoiser predicts, read from its scheduler's config (one place for every stage).

SD-1.5's UNet predicts the noise (``prediction_type = "epsilon"``); SD-2's predicts the velocity
(``"v_prediction"``, Salimans & Ho 2022, Progressive Distillation). The tiny UNet that
``base_models`` pretrains uses v: at the embedded scale and step budget, epsilon prediction leaves
the high-noise steps of sampling to an x0 estimate ``(z_t - sqrt(1 - abar) eps_hat) / sqrt(abar)``
that amplifies every error of ``eps_hat`` by ``sqrt(1 - abar) / sqrt(abar)`` (x 11 at t = 950), and
its 10-step DDIM samples were not faces after 800 steps; v-prediction's were (README, "The pipeline").

    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps
    epsilon:       target = eps
    v_prediction:  target = v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0

The pretraining may weight the per-item loss by Min-SNR-gamma (Hang et al. 2023, ICCV), in the
v-form ``min(SNR_t, gamma) / (SNR_t + 1)`` (epsilon-form ``min(SNR_t, gamma) / SNR_t``), SNR_t =
abar_t / (1 - abar_t): it keeps the low-noise steps, which are easy, from dominating the gradient.
Schedulers built ``from_config`` (DDIM at generation) read the same ``prediction_type``.
"""
from __future__ import annotations

from typing import Optional

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_type(scheduler) -> str:
    kind = str(scheduler.config.prediction_type)
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {kind!r} is not one of {PREDICTION_TYPES}")
    return kind


def _abar(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t broadcast to ``like``'s shape (B, ...)."""
    abar = scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float32)[t.long()]
    return abar.reshape(-1, *([1] * (like.dim() - 1)))


def training_target(scheduler, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target of the denoiser's output for clean ``z0``, noise ``eps`` at ``t``."""
    if prediction_type(scheduler) == "epsilon":
        return eps
    abar = _abar(scheduler, t, z0)
    return (abar.sqrt() * eps.float() - (1 - abar).sqrt() * z0.float()).to(z0.dtype)


def predicted_x0(scheduler, z_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_0 implied by the denoiser's output at ``t``:
    epsilon: (z_t - sqrt(1 - abar) eps_hat) / sqrt(abar);  v: sqrt(abar) z_t - sqrt(1 - abar) v_hat."""
    abar = _abar(scheduler, t, z_t)
    z, out = z_t.float(), model_output.float()
    if prediction_type(scheduler) == "epsilon":
        return ((z - (1 - abar).sqrt() * out) / abar.sqrt()).to(z_t.dtype)
    return (abar.sqrt() * z - (1 - abar).sqrt() * out).to(z_t.dtype)


def min_snr_weight(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) Min-SNR-gamma loss weights for the scheduler's parameterisation."""
    abar = scheduler.alphas_cumprod.to(t.device, torch.float32)[t.long()]
    snr = abar / (1 - abar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type(scheduler) == "v_prediction" else clipped / snr


def denoising_mse(
    scheduler,
    model_output: torch.Tensor,
    z0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    min_snr_gamma: Optional[float] = None,
) -> torch.Tensor:
    """Mean squared error of ``model_output`` against :func:`training_target` (fp32), optionally
    Min-SNR weighted per item."""
    err = (model_output.float() - training_target(scheduler, z0, eps, t).float()) ** 2
    per_item = err.reshape(err.shape[0], -1).mean(1)
    if min_snr_gamma:
        per_item = per_item * min_snr_weight(scheduler, t, min_snr_gamma)
    return per_item.mean()
