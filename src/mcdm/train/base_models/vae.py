"""The tiny VAE: diffusers ``AutoencoderKL`` trained on the training frames (decisions.md #1).

It stands in for SD-1.5's VAE at the embedded scale: RGB ``(3, S, S)`` -> latent ``(4, S/8, S/8)``.
A random decoder renders nothing, so it is trained until its reconstruction PSNR on held-out clips
passes ``base_models.vae_psnr_threshold``; when ``vae_steps`` run out first, the stage stops with a
one-line error naming the PSNR reached. Loss (per pixel, images in [-1, 1]):

    L = |x - D(z)|_1 + |x - D(z)|_2^2 + w_edge * |grad x - grad D(z)|_1 + w_kl * KL(q(z|x) || N(0, I)),
    z ~ q(z|x)                                                   (Kingma & Welling 2014; SD's KL-f8)

After training, SD's convention fixes the latent scale: ``scaling_factor = 1 / std(z)`` over the
training latents (posterior means), stored in the VAE's config so that ``z * scaling_factor`` has
unit variance for the diffusion model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcdm.config import BaseModelsParams
from mcdm.errors import McdmError
from mcdm.models.vae import latent_scaling_factor, psnr, reconstruct, to_model_range
from mcdm.train.builders import tiny_vae_config
from mcdm.train.steps import StepLoop


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(x: torch.Tensor, recon: torch.Tensor, kl: torch.Tensor, bm: BaseModelsParams) -> dict[str, torch.Tensor]:
    """The loss of the module docstring; ``kl`` is per sample (summed over latent elements)."""
    l1 = (recon - x).abs().mean()
    l2 = ((recon - x) ** 2).mean()
    (gx, gy), (rx, ry) = image_gradients(x), image_gradients(recon)
    edge = 0.5 * ((gx - rx).abs().mean() + (gy - ry).abs().mean())
    kl_px = kl.mean() / x[0].numel()  # per pixel, like the reconstruction terms
    total = l1 + l2 + bm.vae_edge_weight * edge + bm.vae_kl_weight * kl_px
    return {"loss": total, "l1": l1, "l2": l2, "edge": edge, "kl": kl_px}


# ------------------------------------------------------------------------------------ training
def narrow_posterior_init(vae, log_var: float = -6.0) -> None:
    """Start the posterior narrow (std e^-3 ~ 0.05): with the default init (log-variance ~ 0) the
    sampled latent is mostly noise and the first few hundred steps only learn to shrink it."""
    c = int(vae.config.latent_channels)
    with torch.no_grad():
        vae.quant_conv.bias[c:].fill_(log_var)


def warmup_cosine(total_steps: int, warmup: int = 50, floor: float = 0.1):
    """LR multiplier: linear warm-up, then cosine decay to ``floor`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class VaeReport:
    psnr: float
    threshold: float
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # {"step", "psnr", "loss"} per check

    best: float = -float("inf")

    @property
    def passed(self) -> bool:
        return self.psnr >= self.threshold

    def to_dict(self) -> dict:
        return {"psnr_heldout": self.psnr, "psnr_threshold": self.threshold, "passed": self.passed,
                "steps": self.steps, "seconds": round(self.seconds, 2), "history": self.history}

    def require_threshold(self, where: str = "") -> None:
        """Raise :class:`VaePsnrNotReached` (one line) when the PSNR gate failed."""
        if not self.passed:
            raise VaePsnrNotReached(
                f"tiny VAE reached held-out PSNR {self.psnr:.2f} dB < base_models.vae_psnr_threshold "
                f"{self.threshold:g} dB after {self.steps} steps (best {self.best:.2f} dB): raise "
                f"base_models.vae_steps or lower the threshold{where}"
            )


class VaePsnrNotReached(McdmError):
    """The tiny VAE ran out of steps below the PSNR threshold."""


def train_vae(
    fit_frames: np.ndarray,
    heldout_frames: np.ndarray,
    bm: BaseModelsParams,
    resolution: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_heldout: int = 128,
    progress: bool = True,
):
    """Train a tiny AutoencoderKL until held-out PSNR >= threshold; returns ``(vae, VaeReport)``.

    The PSNR is checked every ``vae_eval_every`` steps (and at the last step); from ``vae_min_steps``
    on, training stops at the first check that passes (so: at least ``vae_min_steps``, then until the
    threshold, at most ``vae_steps``). When ``vae_steps`` run out below the threshold the
    report says so: ``report.require_threshold()`` raises the one-line error (after the caller has
    written its diagnostics). ``scaling_factor`` is set from the training latents before returning.
    """
    from diffusers import AutoencoderKL

    if len(fit_frames) == 0 or len(heldout_frames) == 0:
        raise McdmError("base_models: the tiny VAE needs training and held-out frames")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL(**tiny_vae_config(bm, resolution)).to(device)
    narrow_posterior_init(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=bm.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(bm.vae_steps))
    held = heldout_frames[np.linspace(0, len(heldout_frames) - 1, min(max_heldout, len(heldout_frames))).astype(int)]
    fit = torch.as_tensor(fit_frames)
    history: list[dict] = []
    started = time.perf_counter()
    best = -float("inf")
    step = 0
    loop = StepLoop(vae.parameters(), opt, bm.vae_steps, scheduler=sched, clip_grad=1.0,
                    desc="base_models: tiny VAE", progress=progress)
    for step in loop:
        vae.train()
        idx = rng.integers(0, len(fit), bm.batch_size)
        x = to_model_range(fit[idx]).to(device)
        if rng.random() < 0.5:  # faces are left-right symmetric enough: flips double the data
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = loop.step(vae_loss(x, recon, posterior.kl(), bm)["loss"])
        if step % bm.vae_eval_every == 0 or step == bm.vae_steps:
            vae.eval()
            value = psnr(held, reconstruct(vae, held))
            best = max(best, value)
            history.append({"step": step, "psnr": round(value, 3), "loss": round(loss, 5)})
            loop.show(psnr=f"{value:.2f}/{bm.vae_psnr_threshold:g} dB", loss=f"{loss:.4f}")
            if value >= bm.vae_psnr_threshold and step >= bm.vae_min_steps:
                break
    vae.eval()
    final = history[-1]["psnr"] if history else psnr(held, reconstruct(vae, held))
    report = VaeReport(psnr=float(final), threshold=bm.vae_psnr_threshold, steps=step,
                       seconds=time.perf_counter() - started, history=history, best=max(best, final))
    some = fit_frames[np.linspace(0, len(fit_frames) - 1, min(2048, len(fit_frames))).astype(int)]
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, some))
    return vae, report


# ------------------------------------------------------------------------------------- picture
def save_recon_grid(vae, frames_uint8: np.ndarray, path: str | Path, n: int = 8, scale: int = 3) -> Path:
    """PNG: top row held-out frames, bottom row their reconstructions (nearest-neighbour upscaled)."""
    from PIL import Image

    pick = frames_uint8[np.linspace(0, len(frames_uint8) - 1, min(n, len(frames_uint8))).astype(int)]
    rows = np.concatenate([np.concatenate(list(pick), 1), np.concatenate(list(reconstruct(vae, pick, batch=n)), 1)], 0)
    rows = rows.repeat(scale, 0).repeat(scale, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(rows).save(tmp)
    tmp.replace(path)
    return path
