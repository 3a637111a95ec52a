"""The three MCDM training stages (paper Sec. 3.5; DECISIONS #4, #6) over the one engine.

Each stage is a :class:`StageTask`: what it builds (trained and frozen modules under one root, the
:class:`StageModel` DeepSpeed wraps), its data, its loss and what it exports. :func:`run_stage` is the
one entry point (``mcdm train --stage N``): it trains through :func:`mcdm.train.engine.train_loop`
(DeepSpeed, checkpoints, resume, NaN stop), exports, and writes the metrics, the loss curve and the
MLflow run.

=====  =========================================================  ==========================================
stage  trains                                                     frozen / not used
=====  =========================================================  ==========================================
1      archived-clip prior (patchify, frame-aligned attention,    present-clip reference attention, MTA
       queries), archived-clip reference attention, the UNet's    (zero-initialised: identity)
       spatial layers, the landmark guider
2      the present-clip motion-prior diffusion model (random      landmark guider (stage 1), motion encoders
       whole-landmark-clip drop); wo_fpc: fits the audio tokens
3      ONLY the present-clip reference attention and the MTA,     everything else (stage 1's denoiser and
       on runs of K consecutive clips, memory carried detached    guider, stage 2's prior)
=====  =========================================================  ==========================================

Losses (standard diffusion MSE, in the base UNet's parameterisation: y = eps for SD-1.5, y = v =
sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 for the pretrained tiny UNet; :mod:`mcdm.models.diffusion_objective`):

* stages 1 and 3:  L = E_{z_0, eps, t} || y_t - f_theta(z_t, t, z_ref, z_arch, F_pc, G(landmarks)) ||^2,
  z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with the base UNet's training schedule, the frames'
  eps of a clip correlated by ``model.frame_noise_correlation`` (``mcdm.models.frame_noise``); the landmark
  guider's features G are dropped for a whole clip with probability ``model.p_drop_landmarks``
  (generation runs without a driving video by default).
  The timesteps of a step's clips are stratified (one per 1/n of [0, T), Kingma et al. 2021): the
  same expected loss with less variance between steps.
* stage 3 over a run of K clips: M_0 = none; for k = 1..K: (y_hat_k, M_k) = f_theta(..., M_{k-1});
  M_k is detached before it is carried (DECISIONS #6), L = mean_k L_k. Each clip has its own
  timestep, so the carried memory comes from every noise level (generation carries the memory of
  the previous clip's last, least noisy step). F_pc comes from the frozen stage-2 prior's token
  embeddings of the clip's true motion tokens (generation: the prior's sampled tokens).
* stage 2:  Eq. 3, ``PresentClipMotionPrior.training_loss``.

Exports (diffusers folders, safetensors + config.json, written to ``<out>.tmp`` and renamed; beside
them ``stage.json`` with the params hash): stage 1 -> ``denoiser/``, ``landmark_guider/``; stage 2 ->
``motion_prior/`` (wo_fpc: ``audio_tokens/``); stage 3 -> ``denoiser/``.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from mcdm.config import Params
from mcdm.errors import McdmError, MissingStageOutput
from mcdm.models.diffusion_objective import denoising_mse, predicted_x0
from mcdm.models.encoders import LandmarkGuider, MotionEncoders, frame_windows, load_strict
from mcdm.models.motion_prior import PresentClipMotionPrior
from mcdm.models.temporal_attention import detach_memory
from mcdm.models.frame_noise import frame_correlated_noise
from mcdm.models.variants import STAGE_GROUPS, MCDMDenoiser, denoiser_config
from mcdm.train.datasets import ClipRuns, FeatureSet, audio_frames, load_feature_set, ref_embeddings

STAGE_JSON = "stage.json"
DENOISER, LANDMARK_GUIDER, MOTION_PRIOR, AUDIO_TOKENS = "denoiser", "landmark_guider", "motion_prior", "audio_tokens"
# variants whose stage 1 is the main line's (they differ only in layers stage 1 leaves untouched)
SHARED_STAGE1 = ("full", "wo_mta", "wo_fpc")
PREVIEW_TIMESTEP = 500
PREVIEW_CLIPS = 4
PREVIEW_PRIOR_STEPS = 10  # DDIM steps of the stage-2 picture (a picture only: not model.prior_inference_steps)
EVAL_ITEMS, EVAL_TIMESTEP_BINS, EVAL_SEED = 8, 4, 1234  # the fixed-batch loss (before / after training)


def stage_name(stage: int) -> str:
    return f"train_stage{stage}"


@dataclass
class StageInputs:
    """Where a stage reads from (paths come from dvc.yaml through the CLI)."""

    features: Path
    base: Optional[Path] = None
    motion_encoders: Optional[Path] = None
    prev: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        self.features = Path(self.features)
        self.base = Path(self.base) if self.base is not None else None
        self.motion_encoders = Path(self.motion_encoders) if self.motion_encoders is not None else None
        self.prev = tuple(Path(p) for p in self.prev)


# --------------------------------------------------------------------------------------------------
# Reading earlier stages' outputs


def read_stage_json(folder: Path) -> dict:
    return json.loads((Path(folder) / STAGE_JSON).read_text())


def previous_output(inputs: StageInputs, stage: int) -> tuple[Path, dict]:
    """The folder (among ``--prev``) that stage ``stage`` exported, and its ``stage.json``."""
    for folder in inputs.prev:
        path = folder / STAGE_JSON
        if path.is_file() and read_stage_json(folder).get("stage") == stage:
            return folder, read_stage_json(folder)
    for folder in inputs.prev:  # named like that stage's output but not (completely) there
        if re.search(rf"stage_?{stage}\b", folder.name) and not (folder / STAGE_JSON).is_file():
            raise MissingStageOutput(folder / STAGE_JSON, stage_name(stage))
    given = ", ".join(str(p) for p in inputs.prev) or "none"
    raise McdmError(f"no stage-{stage} output among --prev ({given}): run `dvc repro {stage_name(stage)}` "
                    f"first and pass its folder with --prev")


def _component(folder: Path, name: str, cls, stage: int):
    path = folder / name
    if not (path / "config.json").is_file():
        raise MissingStageOutput(path, stage_name(stage))
    return load_strict(cls, path).requires_grad_(False)


def _require(path: Optional[Path], what: str, stage: str) -> Path:
    if path is None:
        raise McdmError(f"{what}: required for this stage (give its folder)")
    if not Path(path).exists():
        raise MissingStageOutput(path, stage)
    return Path(path)


def _file_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Building blocks


class StageModel(nn.Module):
    """Every module a stage uses (trained and frozen) under one root, which DeepSpeed wraps;
    ``forward(batch)`` is the stage's loss, so ``engine(batch)`` runs it."""

    def __init__(self, parts: dict[str, nn.Module], loss: Callable[[dict], torch.Tensor]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self._loss = loss

    def forward(self, batch: dict) -> torch.Tensor:
        return self._loss(batch)


class AudioWindowTokens(ModelMixin, ConfigMixin):
    """wo_fpc's present-clip conditioning (paper Table 4: the present-clip prior replaced by an audio
    attention fed audio features): per frame f the audio features of frames f - w .. f + w,
    standardised per channel with the training frames' statistics. (B, F, A) -> (B, F, 2w + 1, A)."""

    @register_to_config
    def __init__(self, audio_dim: int = 80, audio_window: int = 2):
        super().__init__()
        self.register_buffer("audio_mean", torch.zeros(audio_dim))
        self.register_buffer("audio_std", torch.ones(audio_dim))

    @torch.no_grad()
    def fit(self, frames: torch.Tensor) -> "AudioWindowTokens":
        self.audio_mean.copy_(frames.float().mean(0))
        self.audio_std.copy_(frames.float().std(0).clamp(min=1e-3) if len(frames) > 1 else torch.ones_like(frames[0]))
        return self

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        a = (audio.float() - self.audio_mean) / self.audio_std
        windows = frame_windows(rearrange(a, "b f a -> f b a"), 2 * self.config.audio_window + 1)
        return rearrange(windows, "f w b a -> b f w a").to(audio.dtype)


def landmark_guider_for(params: Params, unet_channels: int, latent_side: int, resolution: int) -> LandmarkGuider:
    """The landmark guider whose features are added after the UNet's conv_in (DECISIONS #4)."""
    channels = list(params.model.landmark_guider_channels)
    factor = 2 ** (len(channels) - 1)
    if resolution != latent_side * factor:
        raise McdmError(f"model.landmark_guider_channels: {len(channels) - 1} stride-2 stages map {resolution} px "
                        f"to {resolution // factor}, but the latents are {latent_side}x{latent_side}")
    return LandmarkGuider(conditioning_channels=1, embedding_channels=unet_channels, block_out_channels=channels)


def denoiser_from_base(params: Params, unet2d, alpha: float) -> MCDMDenoiser:
    """The variant's denoiser holding the base UNet's weights. Block types the params leave unset
    (null) are the base UNet's own."""
    config = denoiser_config(params)
    config["alpha"] = alpha
    if params.model.down_block_types is None:
        config.pop("down_block_types")
    if params.model.up_block_types is None:
        config.pop("up_block_types")
    return MCDMDenoiser.from_unet2d(unet2d, **config)


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


# --------------------------------------------------------------------------------------------------
# Stage tasks


class StageTask:
    """What one stage trains and how. Subclasses set ``stage`` and fill ``parts`` (the modules),
    ``dataset``, ``fingerprint``; ``model`` is the :class:`StageModel` DeepSpeed wraps."""

    stage: int = 0
    precision: Optional[str] = None  # forces train.precision (None: from params)
    trains: bool = True  # False: the stage only fits statistics and exports

    def __init__(self, params: Params, inputs: StageInputs, show_progress: bool = True):
        self.params = params
        self.inputs = inputs
        self.show_progress = show_progress
        self.parts: dict[str, nn.Module] = {}
        self.dataset: Optional[ClipRuns] = None
        self.features: Optional[FeatureSet] = None
        self.fingerprint: dict[str, str] = {}
        self.samples_per_item = 1
        self.model: Optional[StageModel] = None

    @classmethod
    def build(cls, params: Params, inputs: StageInputs, show_progress: bool = True) -> "StageTask":
        task = cls(params, inputs, show_progress)
        torch.manual_seed(params.seed)  # new layers' initialisation
        task.setup()
        task.model = StageModel(task.parts, task.loss)
        return task

    def setup(self) -> None:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def trainable(self) -> list[str]:
        """Names (under ``model``) of the parameters this stage trains."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def export_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def preview(self, out_dir: Path) -> Optional[Path]:
        """A picture of what the stage learned (rank 0, after training), or None."""
        return None

    def fixed_batch_loss(self) -> Optional[float]:
        """The loss on a fixed batch with fixed noise (see ``DenoiserStage.fixed_batch_loss``)."""
        return None

    def stage_info(self) -> dict:
        return {}


class DenoiserStage(StageTask):
    """Shared by stages 1 and 3: the denoiser, the landmark guider, the base scheduler and VAE."""

    def _load_base(self) -> None:
        from mcdm.pipelines import base_loading as loading

        base = _require(self.inputs.base, "--base", loading.STAGE)
        self.scheduler = loading.load_scheduler(base)
        self.vae = loading.load_vae(base)
        self.fingerprint["base"] = _file_digest(base / loading.ENCODERS_JSON, base / "unet" / "config.json")

    def _landmark_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, F, 1, S, S) landmark images -> guider features (B, C0, F, h, w), zero for dropped clips."""
        b = images.shape[0]
        guider = self.parts[LANDMARK_GUIDER]
        feats = rearrange(guider(rearrange(images, "b f 1 s t -> (b f) 1 s t")), "(b f) c h w -> b c f h w", b=b)
        keep = keep_mask(b, self.params.model.p_drop_landmarks, feats.device)
        return feats * keep[:, None, None, None, None].to(feats.dtype)

    def _present(self, batch: dict, k: int) -> dict:
        """What the present-clip attention reads for clip k of the run (none in stage 1)."""
        return {}

    def _clip_cond(self, batch: dict, k: int, landmarks: bool = True) -> dict:
        guide = self._landmark_features(batch["landmark_images"][:, k]) if landmarks else None
        return dict(ref_latent=batch["ref_latent"], archived_latents=batch["archived_latents"][:, k],
                    landmark_features=guide, **self._present(batch, k))

    @torch.no_grad()
    def fixed_batch_loss(self) -> float:
        """The stage's loss on a fixed batch, at fixed timesteps (the midpoints of EVAL_TIMESTEP_BINS
        equal bins of [0, T)) and fixed noise, without landmarks (generation's default), memory
        carried through each run: a deterministic before / after measure of the training, free of
        the step-to-step noise of the training loss. Draws nothing from the global RNG."""
        from mcdm.train.data import move_batch

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

        from mcdm.train.base_models.vae import to_uint8
        from mcdm.tracking.runs import image_grid
        from mcdm.train.data import move_batch

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
        from mcdm.pipelines import base_loading as loading

        self._load_base()
        self.features = load_feature_set(self.inputs.features, show_progress=self.show_progress)
        self.fingerprint["features"] = self.features.fingerprint()
        unet2d = loading.load_unet(self.inputs.base)
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
        from mcdm.pipelines import base_loading as loading

        if self.params.model.archived_prior_init == "random":
            return "random"
        if self.params.variant in ("b1", "b2"):
            return f"random ({self.params.variant} has its own prior)"
        ref_tokens = loading.load_ref_tokens(self.inputs.base)
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
        t = stratified_timesteps(z0.shape[0], self.scheduler.config.num_train_timesteps, z0.device)
        loss, _ = diffusion_mse(self.parts[DENOISER], self.scheduler, z0, t,
                                rho=self.params.model.frame_noise_correlation, **self._clip_cond(batch, 0))
        return loss

    def export_modules(self) -> dict[str, nn.Module]:
        return {DENOISER: self.parts[DENOISER], LANDMARK_GUIDER: self.parts[LANDMARK_GUIDER]}


class Stage2(StageTask):
    """Stage 2: the present-clip motion-prior diffusion model (Eq. 3), landmark clips randomly dropped."""

    stage = 2
    precision = "fp32"  # the prior is small; its conditions are standardised in fp32

    def setup(self) -> None:
        prev1, info1 = previous_output(self.inputs, 1)
        self.fingerprint["stage1"] = _file_digest(prev1 / STAGE_JSON)
        if self.params.variant == "wo_fpc":
            self._setup_audio_tokens()
            return
        encoders = MotionEncoders.load(_require(self.inputs.motion_encoders, "--motion-encoders", "motion_encoders"))
        self.fingerprint["motion_encoders"] = _file_digest(self.inputs.motion_encoders / "metrics.json")
        guider = _component(prev1, LANDMARK_GUIDER, LandmarkGuider, 1)
        self.features = load_feature_set(self.inputs.features, motion_encoders=encoders, show_progress=self.show_progress)
        self.fingerprint["features"] = self.features.fingerprint()
        prior = PresentClipMotionPrior.from_params(self.params.model, self.features.audio_dim, self.features.ref_dim,
                                                   guider.token_dim)
        for name, dim in encoders.dims.items():
            if prior.config[f"{name}_dim"] != dim:
                raise McdmError(f"model.{name}_dim={prior.config[f'{name}_dim']} but the motion encoders make {dim}-wide "
                                f"{name} tokens: re-run `dvc repro motion_encoders`")
        prior.fit_condition_statistics(audio_frames(self.features), ref_embeddings(self.features))
        prior.requires_grad_(True)
        self.parts = {MOTION_PRIOR: prior, LANDMARK_GUIDER: guider}
        m = self.params.model
        # the prior reads no archived frames (archived_frames=0: none are cut)
        self.dataset = ClipRuns(self.features, m.clip_frames, 0, clips_per_run=1, with_tokens=True)

    def _setup_audio_tokens(self) -> None:
        """wo_fpc has no present-clip prior: this stage fits its audio tokens' statistics, no steps."""
        self.trains = False
        self.features = load_feature_set(self.inputs.features, show_progress=self.show_progress)
        self.fingerprint["features"] = self.features.fingerprint()
        tokens = AudioWindowTokens(self.features.audio_dim, self.params.model.audio_window)
        if self.features.audio_dim != self.params.model.audio_dim:
            raise McdmError(f"model.audio_dim={self.params.model.audio_dim} but the features hold "
                            f"{self.features.audio_dim}-wide audio (wo_fpc's present attention reads them)")
        self.parts = {AUDIO_TOKENS: tokens.fit(audio_frames(self.features)).requires_grad_(False)}

    def loss(self, batch: dict, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        prior = self.parts[MOTION_PRIOR]
        guider = self.parts[LANDMARK_GUIDER]
        b = batch["audio"].shape[0]
        with torch.no_grad():  # landmark tokens of the frozen guider
            landmarks = rearrange(guider.tokens(rearrange(batch["landmark_images"][:, 0], "b f 1 s t -> (b f) 1 s t")),
                                  "(b f) d -> b f d", b=b)
        return prior.training_loss({
            "audio": batch["audio"][:, 0], "ref_embedding": batch["ref_embedding"], "head": batch["head"][:, 0],
            "lip": batch["lip"][:, 0], "expression": batch["expression"][:, 0], "landmarks": landmarks,
        }, generator=generator)

    def export_modules(self) -> dict[str, nn.Module]:
        if self.params.variant == "wo_fpc":
            return {AUDIO_TOKENS: self.parts[AUDIO_TOKENS]}
        return {MOTION_PRIOR: self.parts[MOTION_PRIOR]}

    @torch.no_grad()
    def fixed_batch_loss(self) -> Optional[float]:
        """Eq. 3 on a fixed batch with fixed timesteps, noise and landmark drops (a private generator)."""
        if not self.trains:
            return None
        from mcdm.train.data import move_batch

        was_training = self.model.training
        self.model.eval()
        batch = move_batch(self.dataset.sampled_items(4 * EVAL_ITEMS), self.device, torch.float32)
        loss = self.loss(batch, generator=torch.Generator().manual_seed(EVAL_SEED))
        self.model.train(was_training)
        return float(loss)

    @torch.no_grad()
    def preview(self, out_dir: Path) -> Optional[Path]:
        """True vs sampled (no landmarks) lip and expression tokens of one clip, first 3 channels each."""
        if not self.trains:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from mcdm.train.data import move_batch

        prior = self.parts[MOTION_PRIOR]
        was_training = self.model.training
        self.model.eval()
        batch = move_batch(self.dataset.fixed_items(1), self.device, torch.float32)
        sampled = prior.sample(batch["audio"][:, 0], batch["ref_embedding"], num_inference_steps=PREVIEW_PRIOR_STEPS,
                               generator=torch.Generator(self.device).manual_seed(0))
        fig, axes = plt.subplots(2, 3, figsize=(10, 5), sharex=True)
        for row, name in enumerate(("lip", "expression")):
            for ch in range(min(3, batch[name].shape[-1])):
                ax = axes[row, ch]
                ax.plot(batch[name][0, 0, :, ch].cpu(), label="true", color="black")
                ax.plot(getattr(sampled, name)[0, :, ch].cpu(), label="sampled", color="tab:orange")
                ax.set_title(f"{name} token, channel {ch}", fontsize=9)
        axes[0, 0].legend(fontsize=8)
        for ax in axes[-1]:
            ax.set_xlabel("frame")
        fig.tight_layout()
        out = out_dir / f"{stage_name(self.stage)}_tokens.png"
        fig.savefig(out, dpi=80)
        plt.close(fig)
        self.model.train(was_training)
        return out


class Stage3(DenoiserStage):
    """Stage 3: ONLY the present-clip reference attention and the MTA, on runs of K clips with the
    memory carried (detached) from clip to clip."""

    stage = 3

    def setup(self) -> None:
        self._load_base()
        prev1, _ = previous_output(self.inputs, 1)
        prev2, _ = previous_output(self.inputs, 2)
        self.fingerprint["stage1"] = _file_digest(prev1 / STAGE_JSON)
        self.fingerprint["stage2"] = _file_digest(prev2 / STAGE_JSON)
        denoiser = denoiser_for_stage3(self.params, prev1 / DENOISER) \
            if (prev1 / DENOISER / "config.json").is_file() else None
        if denoiser is None:
            raise MissingStageOutput(prev1 / DENOISER, stage_name(1))
        guider = _component(prev1, LANDMARK_GUIDER, LandmarkGuider, 1)
        parts: dict[str, nn.Module] = {DENOISER: denoiser, LANDMARK_GUIDER: guider}
        encoders = None
        if self.params.variant == "wo_fpc":
            parts[AUDIO_TOKENS] = _component(prev2, AUDIO_TOKENS, AudioWindowTokens, 2)
        else:
            parts[MOTION_PRIOR] = _component(prev2, MOTION_PRIOR, PresentClipMotionPrior, 2)
            encoders = MotionEncoders.load(_require(self.inputs.motion_encoders, "--motion-encoders", "motion_encoders"))
            self.fingerprint["motion_encoders"] = _file_digest(self.inputs.motion_encoders / "metrics.json")
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
        # one stratum per clip of the whole run (K B clips)
        t = rearrange(stratified_timesteps(k_run * b, self.scheduler.config.num_train_timesteps, self.device),
                      "(k b) -> k b", k=k_run)
        memory, losses = None, []
        for k in range(k_run):
            loss_k, memory = diffusion_mse(denoiser, self.scheduler, batch["latents"][:, k], t[k], memory=memory,
                                           rho=self.params.model.frame_noise_correlation,
                                           **self._clip_cond(batch, k))
            memory = detach_memory(memory)  # carried to the next clip without backprop (DECISIONS #6)
            losses.append(loss_k)
        return torch.stack(losses).mean()

    def export_modules(self) -> dict[str, nn.Module]:
        return {DENOISER: self.parts[DENOISER]}

    def stage_info(self) -> dict:
        return {"alpha": self.params.alpha, "clips_per_run": self.samples_per_item}


TASKS: dict[int, type[StageTask]] = {1: Stage1, 2: Stage2, 3: Stage3}


def build_task(params: Params, stage: int, inputs: StageInputs, show_progress: bool = True) -> StageTask:
    if stage not in TASKS:
        raise McdmError(f"--stage: must be 1, 2 or 3 (got {stage})")
    return TASKS[stage].build(params, inputs, show_progress)


# --------------------------------------------------------------------------------------------------
# Loss curve, EMA, and the run


class StepRecorder:
    """Stands in front of the MLflow tracker the engine reports to: keeps this run's loss curve (also
    in ``<checkpoints>/loss_history.csv`` at every checkpoint, so a resumed run has the whole curve),
    and updates the EMA after every optimizer step."""

    HISTORY = "loss_history.csv"

    def __init__(self, tracker, checkpoint_dir: Path, ema=None, parameters=None):
        self.tracker = tracker
        self.checkpoint_dir = Path(checkpoint_dir)
        self.ema = ema
        self.parameters = parameters
        self.rows: list[tuple[int, float]] = []
        self.speeds: list[float] = []

    @property
    def run_id(self):
        return getattr(self.tracker, "run_id", None)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if "loss" in metrics and "samples_per_s" in metrics:  # one optimizer step
            self.rows.append((int(step), float(metrics["loss"])))
            self.speeds.append(float(metrics["samples_per_s"]))
            if self.ema is not None:
                self.ema.step(self.parameters)
        self.tracker.log_metrics(metrics, step=step)

    def resumed(self, step: int, previous_run) -> None:
        path = self.checkpoint_dir / self.HISTORY
        if path.is_file():
            with path.open() as f:
                self.rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if int(r["step"]) <= step]
        if self.ema is not None:
            self._load_ema(step)
        self.tracker.resumed(step, previous_run)

    def on_checkpoint(self, engine, step: int) -> None:
        from mcdm.train.engine import tag_for

        if getattr(engine, "global_rank", 0) != 0:
            return
        write_loss_csv(self.rows, self.checkpoint_dir / self.HISTORY)
        if self.ema is not None:
            from safetensors.torch import save_file

            folder = self.checkpoint_dir / tag_for(step)
            state = {f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.ema.shadow_params)}
            tmp = folder / ".ema.safetensors.tmp"
            save_file(state, str(tmp), metadata={"optimization_step": str(self.ema.optimization_step)})
            os.replace(tmp, folder / "ema.safetensors")

    def _load_ema(self, step: int) -> None:
        import warnings

        from safetensors import safe_open

        from mcdm.train.engine import tag_for

        path = self.checkpoint_dir / tag_for(step) / "ema.safetensors"
        if not path.is_file():
            warnings.warn(f"{path} missing: the EMA restarts from the resumed weights", stacklevel=2)
            self.ema.shadow_params = [p.detach().clone() for p in self.parameters]
            return
        with safe_open(str(path), framework="pt") as f:
            self.ema.shadow_params = [f.get_tensor(f"shadow.{i}").to(p.device) for i, p in enumerate(self.parameters)]
            self.ema.optimization_step = int(f.metadata()["optimization_step"])

    def __getattr__(self, name):  # anything else the engine may call goes to the tracker
        return getattr(self.tracker, name)


def write_loss_csv(rows: list[tuple[int, float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows((s, f"{v:.6g}") for s, v in rows)
    os.replace(tmp, path)


def write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def loss_summary(rows: list[tuple[int, float]]) -> dict[str, Any]:
    """Mean loss of the first and the last 10% of the steps (at least one step each)."""
    if not rows:
        return {"loss_first10": None, "loss_last10": None, "loss_fell": None}
    losses = [v for _, v in sorted(rows)]
    n = max(1, len(losses) // 10)
    first, last = float(np.mean(losses[:n])), float(np.mean(losses[-n:]))
    return {"loss_first10": first, "loss_last10": last, "loss_fell": bool(last < first)}


@contextlib.contextmanager
def _ema_weights(ema, parameters):
    """Swap the EMA weights in for the export, then put the trained ones back."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def export_stage(task: StageTask, out_dir: Path, rank: int, extra: dict, ema=None) -> Path:
    """``<out>/<component>/`` folders + ``stage.json`` (params hash); every rank calls it."""
    from mcdm.train.engine import export_pretrained

    trained = [p for p in task.model.parameters() if p.requires_grad]
    with _ema_weights(ema, trained):
        out = export_pretrained(task.export_modules(), out_dir, rank=rank,
                                fp32_master=task.trains and ema is None)
    if rank == 0:
        p = task.params
        info = {"stage": task.stage, "name": stage_name(task.stage), "variant": p.variant, "seed": p.seed,
                "params_hash": p.hash(), "components": sorted(task.export_modules()), "ema": ema is not None,
                **task.stage_info(), **extra,
                "inputs": {"features": str(task.inputs.features), "base": str(task.inputs.base),
                           "motion_encoders": str(task.inputs.motion_encoders),
                           "prev": [str(x) for x in task.inputs.prev]},
                "fingerprint": task.fingerprint}
        write_json(info, Path(out) / STAGE_JSON)
    return Path(out)


def registry_bundle(task: StageTask, out_dir: Path, into: Path) -> Path:
    """What generation needs, in one folder (the registered model version; ``MCDMPipeline.from_bundle``
    reads it): stage 3's denoiser, stage 2's prior (or wo_fpc's audio tokens), stage 1's landmark
    guider, the base VAE, scheduler and ``encoders.json``, the motion encoders, every stage's
    ``stage.json`` (as ``stageN.json``) and the ``params.yaml`` that trained it."""
    import shutil

    from mcdm.pipelines import base_loading as loading

    prev1, _ = previous_output(task.inputs, 1)
    prev2, _ = previous_output(task.inputs, 2)
    sources = {DENOISER: out_dir / DENOISER, LANDMARK_GUIDER: prev1 / LANDMARK_GUIDER,
               "vae": task.inputs.base / loading.VAE, "scheduler": task.inputs.base / loading.SCHEDULER}
    for name in (MOTION_PRIOR, AUDIO_TOKENS):
        if (prev2 / name).is_dir():
            sources[name] = prev2 / name
    if task.inputs.motion_encoders is not None and task.inputs.motion_encoders.is_dir():
        sources["motion_encoders"] = task.inputs.motion_encoders
    for name, src in sources.items():
        shutil.copytree(src, into / name)
    shutil.copy2(task.inputs.base / loading.ENCODERS_JSON, into / loading.ENCODERS_JSON)
    for k, folder in ((1, prev1), (2, prev2), (3, out_dir)):
        shutil.copy2(folder / STAGE_JSON, into / f"stage{k}.json")
    from mcdm.config import dump_params

    (into / "params.yaml").write_text(dump_params(task.params))  # the params that trained it
    return into


def stage_spec(task: StageTask, checkpoint_dir: str | Path):
    """The :class:`~mcdm.train.engine.TrainSpec` of ``task``'s stage: ``train.stage<k>``, the task's
    fingerprint, and the task's own precision where it forces one (stage 2 trains in fp32)."""
    from mcdm.train.engine import TrainSpec

    spec = TrainSpec.from_params(task.params, task.stage, checkpoint_dir, fingerprint=task.fingerprint)
    if task.precision:
        spec.precision = task.precision
    return spec


def run_stage(params: Params, stage: int, inputs: StageInputs, out_dir: str | Path, checkpoint_dir: str | Path,
              metrics_path: Optional[str | Path] = None, loss_csv: Optional[str | Path] = None, *,
              task: Optional[StageTask] = None, show_progress: bool = True) -> dict:
    """Train stage ``stage`` (resuming from ``checkpoint_dir``), export to ``out_dir``, write the
    metrics JSON and the loss-curve CSV, and log it all to the stage's MLflow run."""
    import tempfile

    from mcdm.tracking.runs import is_main_line, register_stage_model, stage_run
    from mcdm.train.engine import peak_memory_mb, train_loop

    started = time.time()
    torch.set_num_threads(params.train.threads)
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    task = task or build_task(params, stage, inputs, show_progress)
    spec = stage_spec(task, checkpoint_dir)
    trained = [p for p in task.model.parameters() if p.requires_grad]
    ema = None
    if params.train.ema and task.trains:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trained, decay=params.train.ema_decay)  # decay min(d, (1 + n) / (10 + n))
    metrics: dict[str, Any] = {"stage": stage, "variant": params.variant}
    eval_start = task.fixed_batch_loss()
    with stage_run(params, stage_name(stage), tags={"train_stage": stage}) as tracker:
        recorder = StepRecorder(tracker, checkpoint_dir, ema, trained)
        rank, result = 0, None
        if task.trains:
            result = train_loop(task.model, lambda engine, batch: engine(batch), task.dataset, spec,
                                tracker=recorder, on_checkpoint=recorder.on_checkpoint)
            rank = result.rank
        summary = loss_summary(recorder.rows)
        export_stage(task, out_dir, rank, {"steps": result.steps if result else 0,
                                           "final_loss": result.final_loss if result else None}, ema)
        if rank != 0:
            return metrics
        speed = float(np.median(recorder.speeds)) if recorder.speeds else None
        eval_end = task.fixed_batch_loss()
        metrics.update({
            **summary,
            "fixed_batch_loss_start": eval_start,
            "fixed_batch_loss_end": eval_end,
            "fixed_batch_loss_fell": None if eval_start is None else bool(eval_end < eval_start),
            "steps": result.steps if result else 0,
            "steps_run": result.steps_run if result else 0,
            "resumed_from": result.resumed_from if result else None,
            "final_loss": result.final_loss if result else None,
            "batch_size": spec.batch_size,
            "samples_per_s": speed,
            "clips_per_s": speed * task.samples_per_item if speed else None,
            "train_wall_s": round(result.wall_s, 2) if result else 0.0,
            "wall_s": round(time.time() - started, 2),
            "peak_rss_mb": round(peak_memory_mb()[0], 1),
            "device": str(result.engine.device) if result else "cpu",
            "trainable_parameters": sum(p.numel() for p in trained) if task.trains else 0,
            "ema": ema is not None,
        })
        if metrics_path is not None:
            write_json(metrics, Path(metrics_path))
        if loss_csv is not None:
            write_loss_csv(recorder.rows, Path(loss_csv))
            tracker.log_artifact(loss_csv, "curves")
        tracker.log_metrics({k: float(v) for k, v in metrics.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
                             and math.isfinite(float(v))}, step=metrics["steps"])
        with tempfile.TemporaryDirectory(prefix="mcdm-preview-") as tmp:
            picture = task.preview(Path(tmp)) if task.trains else None
            if picture is not None:
                tracker.log_artifact(picture, "samples")
            if stage == 3 and is_main_line(params):
                bundle = registry_bundle(task, out_dir, Path(tmp) / "mcdm")
                version = register_stage_model(tracker, params, bundle)
                if version is not None:
                    metrics["registered_version"] = version
    return metrics
