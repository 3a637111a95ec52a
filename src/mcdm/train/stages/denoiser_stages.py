"""Stages 1 and 3: the denoiser, trained on clips of the features with the base scheduler."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from einops import rearrange
from torch import nn

from mcdm.config import Params
from mcdm.errors import McdmError, MissingStageOutput
from mcdm.media import layout
from mcdm.media.images import image_grid
from mcdm.media.layout import AUDIO_TOKENS, DENOISER, LANDMARK_GUIDER, MOTION_PRIOR, STAGE_JSON
from mcdm.models.audio_tokens import AudioWindowTokens
from mcdm.models.denoiser import STAGE_GROUPS, MCDMDenoiser
from mcdm.models.diffusion_objective import denoising_mse, predicted_x0
from mcdm.models.frame_noise import frame_correlated_noise
from mcdm.models.landmark_guider import LandmarkGuider
from mcdm.models.loading import load_strict
from mcdm.models.motion_encoders import MotionEncoders
from mcdm.models.motion_prior import PresentClipMotionPrior
from mcdm.models.temporal_attention import detach_memory
from mcdm.models.vae import load_vae, to_uint8
from mcdm.pipelines.loading import load_ref_tokens, load_scheduler, load_unet
from mcdm.train.builders import denoiser_config, denoiser_from_base, landmark_guider_for
from mcdm.train.data import move_batch
from mcdm.train.datasets import ClipRuns, load_feature_set
from mcdm.train.stages.inputs import component, file_digest, previous_output, require, stage_name
from mcdm.train.stages.losses import diffusion_mse, keep_mask
from mcdm.train.stages.task import EVAL_ITEMS, EVAL_SEED, EVAL_TIMESTEP_BINS, StageTask
from mcdm.train.step_random import StepRandom

# variants whose stage 1 is the main line's (they differ only in layers stage 1 leaves untouched)
SHARED_STAGE1 = ("full", "wo_mta", "wo_fpc")


PREVIEW_TIMESTEP = 500
PREVIEW_CLIPS = 4


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ("," if t.ndim == 1 else "") + ")"


def _stage1_line(variant: str) -> str:
    return "full" if variant in SHARED_STAGE1 else variant


def denoiser_for_stage3(params: Params, folder: Path) -> MCDMDenoiser:
    """Stage 1's denoiser, rebuilt from this run's params (variant, alpha, structure; wo_mta / wo_fpc
    reuse the main line's stage 1). Every weight outside the layers stage 3 trains must match in name
    and shape, and the structure in config; otherwise the folder is refused, naming both."""
    source = load_strict(MCDMDenoiser, folder)
    ours, theirs = params.variant, source.config.model_variant
    wanted = denoiser_config(params)
    for key in ("down_block_types", "up_block_types"):  # null in the params: the base UNet's, as in stage 1
        if getattr(params.model, key) is None:
            wanted.pop(key)
    config = {**{k: v for k, v in source.config.items() if not k.startswith("_")}, **wanted}
    target = MCDMDenoiser(**config)
    src_state, dst_state = source.state_dict(), target.state_dict()
    stage3 = STAGE_GROUPS[3]
    problems = []
    for key, value in dst_state.items():
        if target.parameter_group(key) in stage3:
            if key in src_state and src_state[key].shape == value.shape:
                dst_state[key] = src_state[key]
            continue  # trained now: stage 1 never touched it
        if key not in src_state:
            problems.append(f"{key}: missing in {folder} vs {_shape(value)} in this model")
        elif src_state[key].shape != value.shape:
            problems.append(f"{key}: {_shape(src_state[key])} in {folder} vs {_shape(value)} in this model")
        else:
            dst_state[key] = src_state[key]
    extra = [k for k in src_state if k not in dst_state]
    if extra:
        problems.append(f"{len(extra)} weight(s) this model lacks, e.g. {extra[0]} {_shape(src_state[extra[0]])}")
    # structure that shapes do not show (e.g. attention heads); stage 3's own options may differ
    free = {"model_variant", "alpha", "mta_features", "audio_dim", "mta_seed"}
    problems += [f"{k}={source.config[k]!r} in {folder} vs {_as_list(v)!r} in the params" for k, v in wanted.items()
                 if k not in free and _as_list(source.config.get(k)) != _as_list(v)]
    if problems or _stage1_line(ours) != _stage1_line(theirs):
        detail = "; ".join(problems[:3]) if problems else "same shapes"
        raise McdmError(f"refusing {folder}: it was trained for variant {theirs!r}, this run is variant {ours!r} "
                        f"(which needs the stage 1 of variant {_stage1_line(ours)!r}); {detail}")
    target.load_state_dict(dst_state, strict=True)
    return target


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


class DenoiserStage(StageTask):
    """Shared by stages 1 and 3: the denoiser, the landmark guider, the base scheduler and VAE."""

    def _load_base(self) -> None:
        base = require(self.inputs.base, "--base", layout.BASE_STAGE)
        self.scheduler = load_scheduler(base)
        self.vae = load_vae(layout.base_path(base, layout.VAE))
        self.fingerprint["base"] = file_digest(base / layout.ENCODERS_JSON, base / layout.UNET / "config.json")

    def _landmark_features(self, images: torch.Tensor, random: StepRandom) -> torch.Tensor:
        """(B, F, 1, S, S) landmark images -> guider features (B, C0, F, h, w), zero for dropped clips."""
        b = images.shape[0]
        guider = self.parts[LANDMARK_GUIDER]
        feats = rearrange(guider(rearrange(images, "b f 1 s t -> (b f) 1 s t")), "(b f) c h w -> b c f h w", b=b)
        keep = keep_mask(random, self.params.model.p_drop_landmarks, feats.device)
        return feats * keep[:, None, None, None, None].to(feats.dtype)

    def _present(self, batch: dict, k: int) -> dict:
        """What the present-clip attention reads for clip k of the run (none in stage 1)."""
        return {}

    def _clip_cond(self, batch: dict, k: int, landmarks: bool = True) -> dict:
        random = StepRandom.of(batch, batch["latents"].shape[0])
        guide = self._landmark_features(batch["landmark_images"][:, k], random) if landmarks else None
        return dict(ref_latent=batch["ref_latent"], archived_latents=batch["archived_latents"][:, k],
                    landmark_features=guide, **self._present(batch, k))

    @torch.no_grad()
    def fixed_batch_loss(self) -> float:
        """The stage's loss on a fixed batch, at fixed timesteps (the midpoints of EVAL_TIMESTEP_BINS
        equal bins of [0, T)) and fixed noise, without landmarks (generation's default), memory
        carried through each run: a deterministic before / after measure of the training, free of
        the step-to-step noise of the training loss. Draws nothing from the global RNG."""

        denoiser = self.parts[DENOISER]
        was_training = self.model.training
        self.model.eval()
        batch = move_batch(self.dataset.sampled_items(EVAL_ITEMS), self.device, next(denoiser.parameters()).dtype)
        n_t = self.scheduler.config.num_train_timesteps
        gen = torch.Generator().manual_seed(EVAL_SEED)
        losses = []
        for i in range(EVAL_TIMESTEP_BINS):
            t = torch.full((batch["latents"].shape[0],), int((i + 0.5) * n_t / EVAL_TIMESTEP_BINS), device=self.device)
            memory = None
            for k in range(batch["latents"].shape[1]):
                z0 = batch["latents"][:, k]
                eps = frame_correlated_noise(z0.shape, self.params.model.frame_noise_correlation, generator=gen).to(z0)
                out = denoiser(self.scheduler.add_noise(z0, eps, t), t, memory_state=memory,
                               **self._clip_cond(batch, k, landmarks=False))
                memory = out.memory_state
                losses.append(denoising_mse(self.scheduler, out.sample, z0, eps, t))
        self.model.train(was_training)
        return float(torch.stack(losses).mean())

    @torch.no_grad()
    def preview(self, out_dir: Path) -> Optional[Path]:
        """Ground truth, noisy input (t = 500) and the predicted x0 of the first clip's middle frame
        of a few videos, decoded with the VAE; rows in that order."""
        from PIL import Image


        denoiser = self.parts[DENOISER]
        was_training = self.model.training
        self.model.eval()
        dev = self.device
        dtype = next(denoiser.parameters()).dtype
        batch = move_batch(self.dataset.fixed_items(PREVIEW_CLIPS), dev, dtype)
        z0 = batch["latents"][:, 0]
        b = z0.shape[0]
        g = torch.Generator().manual_seed(0)
        eps = torch.randn(z0.shape, generator=g).to(dev, dtype)
        t = torch.full((b,), PREVIEW_TIMESTEP, device=dev, dtype=torch.long)
        z_t = self.scheduler.add_noise(z0, eps, t)
        cond = self._clip_cond(batch, 0)
        cond["landmark_features"] = cond["landmark_features"] * 0  # generation's default: no driving video
        x0_hat = predicted_x0(self.scheduler, z_t, denoiser(z_t, t, **cond).sample, t)
        mid = z0.shape[2] // 2
        rows = [x[:, :, mid] for x in (z0, z_t, x0_hat)]
        vae = self.vae.to(dev)
        scale = float(vae.config.scaling_factor)
        shift = float(vae.config.get("shift_factor") or 0.0)
        images = [to_uint8(vae.decode((r.to(vae.dtype) / scale) + shift).sample) for r in rows]
        grid = image_grid(np.concatenate(images), ncols=b)
        out = out_dir / f"{stage_name(self.stage)}_samples.png"
        Image.fromarray(grid).save(out)
        self.model.train(was_training)
        return out


class Stage1(DenoiserStage):
    """Stage 1: archived-clip prior + archived reference attention + spatial layers + landmark guider."""

    stage = 1

    def setup(self) -> None:
        self._load_base()
        self.features = load_feature_set(self.inputs.features, show_progress=self.show_progress)
        self.fingerprint["features"] = self.features.fingerprint()
        unet2d = load_unet(self.inputs.base)
        # alpha only matters once memory is carried (stage 3 sets it): stage 1 does not read it
        denoiser = denoiser_from_base(self.params, unet2d, alpha=Params.model_fields["alpha"].default)
        self._check_latents(unet2d)
        self.prior_init = self._init_archived_prior(denoiser)
        guider = landmark_guider_for(self.params, denoiser.config.block_out_channels[0],
                                     self.features.latent_shape[-1], self.features.resolution)
        denoiser.freeze_for_stage(1)
        guider.requires_grad_(True)
        self.parts = {DENOISER: denoiser, LANDMARK_GUIDER: guider}
        m = self.params.model
        self.dataset = ClipRuns(self.features, m.clip_frames, m.archived_frames, clips_per_run=1)

    def stage_info(self) -> dict:
        return {"archived_prior_init": self.prior_init}

    def _init_archived_prior(self, denoiser: MCDMDenoiser) -> str:
        """``model.archived_prior_init`` (models/archived_prior.py): warm start from the base reference
        tokens when they exist and the variant's prior can take them; returns what was done."""
        if self.params.model.archived_prior_init == "random":
            return "random"
        if self.params.variant in ("b1", "b2"):
            return f"random ({self.params.variant} has its own prior)"
        ref_tokens = load_ref_tokens(self.inputs.base)
        if ref_tokens is None:
            return "random (the base UNet came from a path: no pretrained reference tokens)"
        denoiser.warm_start_archived_prior(ref_tokens, side=self.features.latent_shape[-1])
        return "reference_tokens"

    def _check_latents(self, unet2d) -> None:
        c, h, w = self.features.latent_shape
        if c != unet2d.config.in_channels or h != unet2d.config.sample_size:
            raise McdmError(f"{self.inputs.features}: latents are ({c}, {h}, {w}) but the base UNet expects "
                            f"({unet2d.config.in_channels}, {unet2d.config.sample_size}, {unet2d.config.sample_size}): "
                            "re-run `dvc repro features` after base_models")

    def loss(self, batch: dict) -> torch.Tensor:
        z0 = batch["latents"][:, 0]
        random = StepRandom.of(batch, z0.shape[0])
        t = random.stratified_timesteps(self.scheduler.config.num_train_timesteps, device=z0.device)[0]
        loss, _ = diffusion_mse(self.parts[DENOISER], self.scheduler, z0, t, random=random,
                                rho=self.params.model.frame_noise_correlation, **self._clip_cond(batch, 0))
        return loss

    def export_modules(self) -> dict[str, nn.Module]:
        return {DENOISER: self.parts[DENOISER], LANDMARK_GUIDER: self.parts[LANDMARK_GUIDER]}


class Stage3(DenoiserStage):
    """Stage 3: ONLY the present-clip reference attention and the MTA, on runs of K clips with the
    memory carried (detached) from clip to clip."""

    stage = 3

    def setup(self) -> None:
        self._load_base()
        prev1, _ = previous_output(self.inputs, 1)
        prev2, _ = previous_output(self.inputs, 2)
        self.fingerprint["stage1"] = file_digest(prev1 / STAGE_JSON)
        self.fingerprint["stage2"] = file_digest(prev2 / STAGE_JSON)
        denoiser = denoiser_for_stage3(self.params, prev1 / DENOISER) \
            if (prev1 / DENOISER / "config.json").is_file() else None
        if denoiser is None:
            raise MissingStageOutput(prev1 / DENOISER, stage_name(1))
        guider = component(prev1, LANDMARK_GUIDER, LandmarkGuider, 1)
        parts: dict[str, nn.Module] = {DENOISER: denoiser, LANDMARK_GUIDER: guider}
        encoders = None
        if self.params.variant == "wo_fpc":
            parts[AUDIO_TOKENS] = component(prev2, AUDIO_TOKENS, AudioWindowTokens, 2)
        else:
            parts[MOTION_PRIOR] = component(prev2, MOTION_PRIOR, PresentClipMotionPrior, 2)
            encoders = MotionEncoders.load(require(self.inputs.motion_encoders, "--motion-encoders", "motion_encoders"))
            self.fingerprint["motion_encoders"] = file_digest(self.inputs.motion_encoders / "metrics.json")
        self.features = load_feature_set(self.inputs.features, motion_encoders=encoders, show_progress=self.show_progress)
        self.fingerprint["features"] = self.features.fingerprint()
        for module in parts.values():
            module.requires_grad_(False)
        denoiser.freeze_for_stage(3)
        self.parts = parts
        m = self.params.model
        k = self.params.train.stage3.clips_per_run
        self.samples_per_item = k
        self.dataset = ClipRuns(self.features, m.clip_frames, m.archived_frames, clips_per_run=k,
                                with_tokens=encoders is not None)

    def _present(self, batch: dict, k: int) -> dict:
        if AUDIO_TOKENS in self.parts:
            return {"audio_tokens": self.parts[AUDIO_TOKENS](batch["audio"][:, k])}
        prior = self.parts[MOTION_PRIOR]
        dtype = next(self.parts[DENOISER].parameters()).dtype
        # F_pc (B, F, 3, d): the frozen prior's embeddings of the clip's motion tokens (the prior
        # embeds in fp32; under bf16 training its weights are bf16, hence autocast)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=prior.dtype != torch.float32):
            f_pc = prior.present_clip_tokens(batch["head"][:, k], batch["lip"][:, k], batch["expression"][:, k])
        return {"present_tokens": f_pc.to(dtype)}

    def loss(self, batch: dict) -> torch.Tensor:
        denoiser = self.parts[DENOISER]
        b, k_run = batch["latents"].shape[:2]
        random = StepRandom.of(batch, b)
        # one stratum per clip of the whole run (K x the global batch's clips): (K, B)
        t = random.stratified_timesteps(self.scheduler.config.num_train_timesteps, per_sample=k_run, device=self.device)
        memory, losses = None, []
        for k in range(k_run):
            loss_k, memory = diffusion_mse(denoiser, self.scheduler, batch["latents"][:, k], t[k], memory=memory,
                                           rho=self.params.model.frame_noise_correlation, random=random,
                                           **self._clip_cond(batch, k))
            memory = detach_memory(memory)  # carried to the next clip without backprop (decisions.md #6)
            losses.append(loss_k)
        return torch.stack(losses).mean()

    def export_modules(self) -> dict[str, nn.Module]:
        return {DENOISER: self.parts[DENOISER]}

    def stage_info(self) -> dict:
        return {"alpha": self.params.alpha, "clips_per_run": self.samples_per_item}
