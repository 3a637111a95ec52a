"""The frozen VAE at inference: images <-> scaled latents (SD's convention: ``z * scaling_factor``
has unit variance), and the reconstruction PSNR its quality gate is measured in."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from mcdm.models.loading import load_strict


def vae_downsample(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ------------------------------------------------------------------------------------- tensors
def to_model_range(frames_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    x = torch.as_tensor(np.asarray(frames_uint8))
    return rearrange(x, "n h w c -> n c h w").float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "n c h w -> n h w c").cpu().numpy()


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of uint8 images over the whole set: 10 log10(255^2 / MSE) (MSE pooled over all pixels)."""
    mse = np.mean((reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * math.log10(255.0**2 / mse))


# ----------------------------------------------------------------------------------- inference
@torch.no_grad()
def encode_latents(vae, frames_uint8: np.ndarray, batch: int = 64, scaled: bool = True) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, C, h, w) posterior means, times ``scaling_factor`` when ``scaled``."""
    device, dtype = vae.device, vae.dtype
    out = []
    for i in range(0, len(frames_uint8), batch):
        x = to_model_range(frames_uint8[i : i + batch]).to(device, dtype)
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
    z = torch.cat(out) if out else torch.zeros(0)
    if scaled:
        shift = vae.config.get("shift_factor") or 0.0
        z = (z - shift) * float(vae.config.scaling_factor)
    return z


@torch.no_grad()
def reconstruct(vae, frames_uint8: np.ndarray, batch: int = 64) -> np.ndarray:
    """Encode (posterior mean) and decode: the deterministic reconstruction the PSNR is measured on."""
    device, dtype = vae.device, vae.dtype
    out = []
    for i in range(0, len(frames_uint8), batch):
        x = to_model_range(frames_uint8[i : i + batch]).to(device, dtype)
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(out)


def latent_scaling_factor(vae, frames_uint8: np.ndarray) -> float:
    """SD's convention: 1 / std of the (unscaled) training latents."""
    z = encode_latents(vae, frames_uint8, scaled=False)
    return float(1.0 / z.std().clamp(min=1e-6))


def load_vae(folder: str | Path, device: str | torch.device = "cpu"):
    """The frozen VAE of a ``save_pretrained`` folder (``requires_grad`` off, eval mode)."""
    from diffusers import AutoencoderKL

    return load_strict(AutoencoderKL, folder).requires_grad_(False).to(device)
