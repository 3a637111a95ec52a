"""The tiny SD-shaped UNet, pretrained as a reference-conditioned image denoiser (decisions.md #1).

It stands in for SD-1.5's UNet at the embedded scale, so that the MCDM stages start from a backbone
that already denoises faces. Same block layout as SD-1.5 (``CrossAttnDownBlock2D`` ... ``DownBlock2D``,
``UNetMidBlock2DCrossAttn``, ``UpBlock2D`` ... ``CrossAttnUpBlock2D``), widths from
``model.block_out_channels``, ``cross_attention_dim = model.prior_dim``. Where SD cross-attends to text
tokens, this one cross-attends to the tokens of a REFERENCE frame of the same clip
(:class:`~mcdm.models.reference_tokens.ReferenceTokens`). Objective, DDPM epsilon-prediction (Ho et al. 2020),
with SD-1.5's noise schedule:

    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,   L = E_{z_0, eps, t} |eps - eps_theta(z_t, t, tok(z_ref))|^2
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mcdm.config import BaseModelsParams, ModelParams
from mcdm.errors import McdmError
from mcdm.models.diffusion_objective import denoising_mse, training_target
from mcdm.models.reference_tokens import ReferenceTokens
from mcdm.models.schedulers import make_scheduler
from mcdm.train.builders import tiny_unet_config
from mcdm.train.steps import StepLoop

EVAL_TIMESTEPS = (50, 250, 500, 750, 950)


def _reference_indices(clip_index: np.ndarray, rng: np.random.Generator, targets: np.ndarray) -> np.ndarray:
    """For each target frame, a random frame of the same clip (the reference)."""
    members = {c: np.flatnonzero(clip_index == c) for c in np.unique(clip_index)}
    return np.array([rng.choice(members[clip_index[t]]) for t in targets])


@dataclass
class UnetReport:
    steps: int
    seconds: float
    prediction_type: str
    heldout_loss_init: float
    heldout_loss: float
    heldout_loss_wrong_ref: float
    per_timestep: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "prediction_type": self.prediction_type,
            "heldout_loss_init": self.heldout_loss_init,
            "heldout_loss": self.heldout_loss,
            "heldout_loss_wrong_reference": self.heldout_loss_wrong_ref,
            "heldout_loss_per_timestep": self.per_timestep,
            "note": f"unweighted {self.prediction_type} MSE on held-out clips at fixed noise and timesteps; "
                    "about 1.0 = predicting zero",
            "history": self.history,
        }


@torch.no_grad()
def heldout_loss(unet, ref_tokens, scheduler, latents: torch.Tensor, refs: torch.Tensor, seed: int = 0) -> dict[int, float]:
    """Unweighted MSE (of the scheduler's prediction type) per fixed timestep on ``latents`` with
    references ``refs`` (same noise every call)."""
    unet.eval()
    ref_tokens.eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    device = unet.device
    out = {}
    for t in EVAL_TIMESTEPS:
        errs = []
        for i in range(0, len(latents), 64):
            z0, eps, ref = latents[i : i + 64].to(device), noise[i : i + 64].to(device), refs[i : i + 64].to(device)
            ts = torch.full((len(z0),), t, dtype=torch.long, device=device)
            pred = unet(scheduler.add_noise(z0, eps, ts), ts, encoder_hidden_states=ref_tokens(ref)).sample
            errs.append(((pred - training_target(scheduler, z0, eps, ts)) ** 2).mean((1, 2, 3)).cpu())
        out[t] = float(torch.cat(errs).mean())
    return out


def train_unet(
    fit_latents: torch.Tensor,
    fit_clip_index: np.ndarray,
    heldout_latents: torch.Tensor,
    heldout_clip_index: np.ndarray,
    bm: BaseModelsParams,
    model: ModelParams,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_heldout: int = 128,
    progress: bool = True,
):
    """Pretrain ``(unet, ref_tokens)`` on scaled VAE latents; returns ``(unet, ref_tokens, scheduler, UnetReport)``."""
    from diffusers import UNet2DConditionModel


    if len(fit_latents) == 0:
        raise McdmError("base_models: no training latents for the UNet pretraining")
    c, h, w = fit_latents.shape[1:]
    if h != w:
        raise McdmError(f"base_models: latents must be square, got {h}x{w}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    unet = UNet2DConditionModel(**tiny_unet_config(model, h, c)).to(device)
    ref_tokens = ReferenceTokens(latent_channels=c, sample_size=h, patch_size=model.patch_size, dim=model.prior_dim).to(device)
    scheduler = make_scheduler(bm.prediction_type)
    params = list(unet.parameters()) + list(ref_tokens.parameters())
    opt = torch.optim.AdamW(params, lr=bm.unet_lr, weight_decay=0.0)

    # fixed held-out evaluation set: right reference (same clip) and wrong reference (another clip's frame)
    pick = np.linspace(0, len(heldout_latents) - 1, min(max_heldout, len(heldout_latents))).astype(int)
    held = heldout_latents[pick]
    eval_rng = np.random.default_rng(seed + 2)
    held_ref = heldout_latents[_reference_indices(heldout_clip_index, eval_rng, pick)]
    wrong_ref = fit_latents[eval_rng.integers(0, len(fit_latents), len(pick))]
    init = heldout_loss(unet, ref_tokens, scheduler, held, held_ref, seed)

    history: list[dict] = []
    started = time.perf_counter()
    running = None
    loop = StepLoop(params, opt, bm.unet_steps, clip_grad=1.0, desc="base_models: UNet (reference-conditioned denoiser)",
                    progress=progress)
    for step in loop:
        unet.train()
        ref_tokens.train()
        idx = rng.integers(0, len(fit_latents), bm.unet_batch_size)
        ref_idx = _reference_indices(fit_clip_index, rng, idx)
        z0 = fit_latents[idx].to(device)
        ref = fit_latents[ref_idx].to(device)
        if rng.random() < 0.5:  # the same flip for target and reference keeps them one face
            z0, ref = z0.flip(-1), ref.flip(-1)
        eps = torch.randn_like(z0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), device=device)
        # L = w_t |y_t - f_theta(z_t, t, tok(z_ref))|^2
        pred = unet(scheduler.add_noise(z0, eps, t), t, encoder_hidden_states=ref_tokens(ref)).sample
        value = loop.step(denoising_mse(scheduler, pred, z0, eps, t, min_snr_gamma=bm.min_snr_gamma))
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 50 == 0 or step == bm.unet_steps:
            loop.show(loss=f"{running:.4f}")
            history.append({"step": step, "loss": round(running, 5)})
    final = heldout_loss(unet, ref_tokens, scheduler, held, held_ref, seed)
    wrong = heldout_loss(unet, ref_tokens, scheduler, held, wrong_ref, seed)
    report = UnetReport(
        steps=bm.unet_steps,
        seconds=time.perf_counter() - started,
        prediction_type=bm.prediction_type,
        heldout_loss_init=float(np.mean(list(init.values()))),
        heldout_loss=float(np.mean(list(final.values()))),
        heldout_loss_wrong_ref=float(np.mean(list(wrong.values()))),
        per_timestep={str(k): round(v, 5) for k, v in final.items()},
        history=history,
    )
    return unet.eval(), ref_tokens.eval(), scheduler, report
