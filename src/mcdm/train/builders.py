"""Builders: validated params -> model constructor arguments and models (the models know no params schema).

Every network is built here from ``params`` (:mod:`mcdm.config`): the tiny VAE and the SD-shaped UNet
of ``base_models``, the variant's denoiser, the landmark guider, the present-clip motion prior, and
an untrained pipeline of all of them (benchmarks, plumbing tests).
"""
from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from mcdm.config import BaseModelsParams, ModelParams, Params
from mcdm.errors import McdmError
from mcdm.models.audio_tokens import AudioWindowTokens
from mcdm.models.denoiser import MCDMDenoiser
from mcdm.models.landmark_guider import LandmarkGuider
from mcdm.models.motion_encoders import HeadPoseEncoder
from mcdm.models.motion_prior import PresentClipMotionPrior
from mcdm.models.schedulers import SD15_SCHEDULER
from mcdm.pipelines.loading import pipeline_config
from mcdm.pipelines.mcdm import MCDMPipeline


def tiny_vae_config(bm: BaseModelsParams, resolution: int) -> dict:
    """AutoencoderKL keyword arguments: ``len(widths)`` blocks, so ``2^(n-1)`` downsampling."""
    widths = list(bm.vae_block_out_channels)
    bad = [w for w in widths if w % bm.vae_norm_num_groups]
    if bad:
        raise McdmError(f"base_models.vae_norm_num_groups={bm.vae_norm_num_groups} does not divide the widths {bad}")
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(widths),
        up_block_types=["UpDecoderBlock2D"] * len(widths),
        block_out_channels=widths,
        layers_per_block=bm.vae_layers_per_block,
        latent_channels=bm.vae_latent_channels,
        norm_num_groups=bm.vae_norm_num_groups,
        sample_size=resolution,
        scaling_factor=1.0,  # set from the training latents after training
    )


def _norm_groups(widths: list[int]) -> int:
    """SD's 32 GroupNorm groups when every width allows it, else the largest common divisor <= 32."""
    g = math.gcd(*widths)
    return max(d for d in range(1, min(32, g) + 1) if g % d == 0)


def tiny_unet_config(model: ModelParams, sample_size: int, latent_channels: int = 4) -> dict:
    """UNet2DConditionModel keyword arguments at ``model``'s widths: SD-1.5's layout (attention at every
    level but the lowest), or ``model.down_block_types`` / ``up_block_types`` where the params set them
    (e.g. the quality profile's attention at the low-resolution levels only)."""
    widths = list(model.block_out_channels)
    n = len(widths)
    down = list(model.down_block_types or ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
    up = list(model.up_block_types or ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
    for key, types in (("down_block_types", down), ("up_block_types", up)):
        if len(types) != n:
            raise McdmError(f"model.{key}: {len(types)} entries for {n} block_out_channels")
    return dict(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=up,
        block_out_channels=widths,
        layers_per_block=model.layers_per_block,
        attention_head_dim=model.attention_head_dim,
        cross_attention_dim=model.prior_dim,
        norm_num_groups=_norm_groups(widths),
    )


def denoiser_config(params: Params) -> dict:
    """``MCDMDenoiser`` config from the validated params (top-level ``variant`` / ``alpha`` + ``model``)."""
    m = params.model
    n = len(m.block_out_channels)
    down = m.down_block_types or ["CrossAttnDownBlock2D"] * n
    up = m.up_block_types or ["CrossAttnUpBlock2D"] * n
    return dict(
        model_variant=params.variant,
        alpha=params.alpha,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block,
        num_attention_heads=m.attention_head_dim,
        norm_num_groups=m.norm_num_groups,
        prior_dim=m.prior_dim,
        archived_frames=m.archived_frames,
        num_queries=m.num_queries,
        patch_size=m.patch_size,
        frame_attention_heads=m.frame_attention_heads,
        qformer_layers=m.qformer_layers,
        qformer_heads=m.prior_heads,
        audio_dim=m.audio_dim,
        mta_features=m.mta_features,
    )


def build_denoiser(params: Params, unet2d=None) -> MCDMDenoiser:
    """The variant's denoiser; with ``unet2d`` (the base SD-shaped UNet) its weights are loaded.

    The base UNet's structure must agree with ``params.model`` (a mismatch names the key).
    """
    config = denoiser_config(params)
    if unet2d is None:
        model = MCDMDenoiser(**config)
    else:
        model = MCDMDenoiser.from_unet2d(unet2d, **config)
    if params.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def landmark_guider_for(params: Params, unet_channels: int, latent_side: int, resolution: int) -> LandmarkGuider:
    """The landmark guider whose features are added after the UNet's conv_in (decisions.md #4)."""
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


def motion_prior_from_params(model: ModelParams, audio_dim: int, ref_dim: int, landmark_dim: int) -> PresentClipMotionPrior:
    """The present-clip motion prior of ``params.model``, for the features' and the guider's widths."""
    return PresentClipMotionPrior(audio_dim=audio_dim, ref_dim=ref_dim, lip_dim=model.lip_dim,
                                  expression_dim=model.expression_dim, landmark_dim=landmark_dim, dim=model.prior_dim,
                                  num_layers=model.prior_layers, num_heads=model.prior_heads,
                                  audio_window=model.audio_window, num_train_timesteps=model.prior_train_timesteps,
                                  beta_schedule=model.prior_beta_schedule, p_drop_landmarks=model.p_drop_landmarks)


def build_untrained_pipeline(params: Params, seed: int = 0) -> MCDMPipeline:
    """Every component at the params' sizes with random weights (benchmarks, plumbing tests): the
    tiny VAE of ``base_models``, the variant's denoiser, the motion prior, landmark guider, head encoder."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config(params.base_models, params.data.resolution)).eval()
    den = build_denoiser(params).eval()
    guider = LandmarkGuider(embedding_channels=params.model.block_out_channels[0],
                            block_out_channels=tuple(params.model.landmark_guider_channels)).eval()
    prior = tokens = None
    if params.variant == "wo_fpc":
        tokens = AudioWindowTokens(80, params.model.audio_window)
    else:
        prior = motion_prior_from_params(params.model, audio_dim=80,
                                         ref_dim=128 + 4 * params.base_models.vae_latent_channels,
                                         landmark_dim=guider.token_dim).eval()
    return MCDMPipeline(vae=vae, denoiser=den, scheduler=DDIMScheduler(**SD15_SCHEDULER), motion_prior=prior,
                        audio_tokens=tokens, landmark_guider=guider, head_encoder=HeadPoseEncoder().eval(),
                        **pipeline_config(params),
                        provenance={"source": "untrained", "variant": params.variant, "alpha": params.alpha})
