"""Loading: the base models and the assembled pipeline from local folders.

- ``load_base_models(base)``: what ``base_models`` made (VAE, SD-shaped UNet, reference tokens,
  scheduler, ``encoders.json``), as the training stages start from it;
- ``load_pipeline(checkpoint)``: the :class:`~mcdm.pipelines.mcdm.MCDMPipeline` of a ``models/``
  folder of this repo's stages, of the bundle stage 3 registers, or of a ``save_pretrained`` pipeline
  folder. A registry URI (``models:/name@alias``) is resolved to a local folder by
  :func:`mcdm.tracking.registry.download_model` before it comes here.

Every network loads strictly (a missing or unexpected weight is a one-line error); folder names come
from :mod:`mcdm.media.layout`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPVisionModelWithProjection, Wav2Vec2Model

from mcdm.config import Params, load_params
from mcdm.errors import McdmError, MissingStageOutput
from mcdm.media import layout
from mcdm.models.audio_tokens import AudioWindowTokens
from mcdm.models.denoiser import MCDMDenoiser
from mcdm.models.landmark_guider import LandmarkGuider
from mcdm.models.loading import load_strict
from mcdm.models.motion_encoders import HeadPoseEncoder
from mcdm.models.motion_prior import PresentClipMotionPrior
from mcdm.models.reference_tokens import ReferenceTokens
from mcdm.models.schedulers import SD15_SCHEDULER
from mcdm.models.vae import load_vae
from mcdm.pipelines.mcdm import MCDMPipeline, clip_format


# ------------------------------------------------------------------------------------ base models
def load_unet(base_dir: str | Path, device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """The SD-shaped UNet the MCDM UNet is built from (eval mode; the caller decides what trains)."""
    return load_strict(UNet2DConditionModel, layout.base_path(base_dir, layout.UNET)).to(device)


def load_ref_tokens(base_dir: str | Path, device: str | torch.device = "cpu") -> Optional[ReferenceTokens]:
    """The reference tokenizer pretrained with the UNet, or None when the UNet came from a path."""
    path = Path(base_dir) / layout.REF_TOKENS
    if not path.is_dir():
        layout.base_path(base_dir, layout.UNET)  # the stage has run at all
        return None
    return load_strict(ReferenceTokens, path).to(device)


def load_scheduler(base_dir: str | Path) -> DDPMScheduler:
    """The base UNet's training schedule (its prediction type included)."""
    return DDPMScheduler.from_pretrained(layout.base_path(base_dir, layout.SCHEDULER))


@dataclass
class BaseModels:
    """Everything ``base_models`` made, loaded: what the training stages start from."""

    vae: object
    unet: UNet2DConditionModel
    ref_tokens: Optional[ReferenceTokens]
    scheduler: DDPMScheduler
    encoders: dict

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = int(self.vae.config.latent_channels)
        s = int(self.unet.config.sample_size)
        return c, s, s


def load_base_models(base_dir: str | Path, device: str | torch.device = "cpu") -> BaseModels:
    return BaseModels(vae=load_vae(layout.base_path(base_dir, layout.VAE), device), unet=load_unet(base_dir, device),
                      ref_tokens=load_ref_tokens(base_dir, device), scheduler=load_scheduler(base_dir),
                      encoders=layout.read_encoders(base_dir))


# ------------------------------------------------------------------------------------ the pipeline
def pipeline_config(params: Params, audio_backend: str = "logmel", image_backend: str = "dlib+vae") -> dict:
    """The pipeline's non-network config from the params the models were trained with."""
    return dict(data=clip_format(params.data), clip_frames=params.model.clip_frames,
                prior_steps=params.model.prior_inference_steps, audio_window=params.model.audio_window,
                default_steps=params.eval.steps, frame_noise_correlation=params.model.frame_noise_correlation,
                audio_backend=audio_backend, image_backend=image_backend)


def _folder(path: Optional[str | Path], component: str) -> Path:
    if path is None or not Path(path).is_dir():
        raise layout.missing_component(path, component)
    return Path(path)


def _optional(path: Optional[str | Path], cls, device):
    return load_strict(cls, path).requires_grad_(False).to(device) if path and Path(path).is_dir() else None


def load_from_stages(params: Params, base: str | Path, denoiser: str | Path, motion_prior: Optional[str | Path] = None,
                     audio_tokens: Optional[str | Path] = None, landmark_guider: Optional[str | Path] = None,
                     head_encoder: Optional[str | Path] = None, stage_json: Optional[str | Path] = None,
                     device: str | torch.device = "cpu") -> MCDMPipeline:
    """Assemble the pipeline from the stage outputs (every network loaded strictly).

    ``base`` holds ``vae/``, ``scheduler/`` and ``encoders.json`` (``models/base`` or a registry
    bundle); ``stage_json``: stage 3's ``stage.json`` (default: beside the denoiser folder). The
    landmark guider and head encoder are optional (only landmark-driven generation needs them).
    """
    base, den_dir = _folder(base, "base"), _folder(denoiser, layout.DENOISER)
    encoders = layout.read_encoders(base)
    if encoders.get("resolution") not in (None, params.data.resolution):
        raise McdmError(f"{base}: the base models were made at {encoders['resolution']} px, but "
                        f"data.resolution is {params.data.resolution}")
    vae = load_vae(layout.base_path(base, layout.VAE), device)
    try:
        scheduler = DDIMScheduler.from_config(load_scheduler(base).config)
    except MissingStageOutput:
        scheduler = DDIMScheduler(**SD15_SCHEDULER)
    den = load_strict(MCDMDenoiser, den_dir).requires_grad_(False).to(device)
    stage_path = Path(stage_json) if stage_json else den_dir.parent / layout.STAGE_JSON
    stage = layout.read_stage_json(stage_path)
    if stage.get("variant") not in (None, den.config.model_variant):
        raise McdmError(f"{stage_path}: says variant {stage['variant']!r}, the denoiser is {den.config.model_variant!r}")
    prior = tokens = None
    if den.config.model_variant == "wo_fpc":
        tokens = load_strict(AudioWindowTokens, _folder(audio_tokens, layout.AUDIO_TOKENS)).to(device)
    else:
        prior = load_strict(PresentClipMotionPrior, _folder(motion_prior, layout.MOTION_PRIOR)).requires_grad_(False).to(device)
    audio_encoder = image_encoder = None
    if encoders["audio"]["backend"] == "wav2vec2":
        path = _folder(base / layout.AUDIO_ENCODER, "base")
        audio_encoder = Wav2Vec2Model.from_pretrained(str(path), use_safetensors=True).eval().to(device)
    if encoders["image"]["backend"] == "clip":
        path = _folder(base / layout.IMAGE_ENCODER, "base")
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(str(path), use_safetensors=True).eval().to(device)
    provenance = {
        "source": str(den_dir), "variant": den.config.model_variant, "alpha": float(den.config.alpha),
        "params_hash": stage.get("params_hash", params.hash()),
        **{k: stage[k] for k in ("seed", "steps") if k in stage},
    }
    return MCDMPipeline(vae=vae, denoiser=den, scheduler=scheduler, motion_prior=prior, audio_tokens=tokens,
                        landmark_guider=_optional(landmark_guider, LandmarkGuider, device),
                        head_encoder=_optional(head_encoder, HeadPoseEncoder, device), audio_encoder=audio_encoder,
                        image_encoder=image_encoder,
                        **pipeline_config(params, encoders["audio"]["backend"], encoders["image"]["backend"]),
                        provenance=provenance)


def load_from_models_dir(models_dir: str | Path, params: Params, overrides: Optional[dict] = None,
                         device: str | torch.device = "cpu") -> MCDMPipeline:
    """The pipeline of a ``models/`` folder laid out as the DVC stages write it; ``overrides`` maps a
    component to another folder (e.g. an ablation member's stage-3 denoiser)."""
    return load_from_stages(params, device=device, **layout.models_paths(models_dir, overrides))


def load_from_bundle(bundle: str | Path, params: Optional[Params] = None,
                     device: str | torch.device = "cpu") -> MCDMPipeline:
    """The bundle stage 3 registers: every component in one folder. Its ``params.yaml`` (the params
    that trained it) wins over ``params``."""
    bundle = Path(bundle)
    if (bundle / layout.BUNDLE_PARAMS).is_file():
        params = load_params(bundle / layout.BUNDLE_PARAMS)
    if params is None:
        raise McdmError(f"{bundle}: the bundle holds no {layout.BUNDLE_PARAMS}; give the params it was trained with")
    return load_from_stages(params, stage_json=bundle / layout.bundle_stage_json(3), device=device,
                            **layout.bundle_paths(bundle))


def checkpoint_folder(checkpoint: str | Path) -> Path:
    """A local checkpoint folder, or a one-line error naming what is wrong with the path."""
    path = Path(checkpoint)
    if not path.exists():
        if path.name == "models":
            sub, stage = layout.MODELS_LAYOUT[layout.DENOISER]
            raise MissingStageOutput(path / sub, stage)
        raise McdmError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise McdmError(f"{path}: a checkpoint is a folder, not a file")
    return path


def needs_params(checkpoint: str | Path) -> bool:
    """Whether loading ``checkpoint`` needs the params it was trained with: only a ``models/`` folder
    does (a bundle, a pipeline folder and a registered MLflow model carry their own)."""
    path = Path(checkpoint)
    if layout.pyfunc_bundle(path) is not None or (path / "model_index.json").is_file():
        return False
    return not ((path / layout.DENOISER).is_dir() and (path / layout.ENCODERS_JSON).is_file())


def load_pipeline(checkpoint: str | Path, params: Optional[Params] = None,
                  device: str | torch.device = "cpu") -> MCDMPipeline:
    """A ``models/`` folder of this repo's stages, the bundle stage 3 registers (or the MLflow pyfunc
    model that holds it), a stage-3 output folder beside ``base/``, or a ``save_pretrained`` pipeline
    folder. ``params`` is needed only for a ``models/`` folder (the others carry their own)."""
    path = checkpoint_folder(checkpoint)
    inner = layout.pyfunc_bundle(path)
    if inner is not None:
        path = checkpoint_folder(inner)
    if (path / "model_index.json").is_file():
        pipe = _load_pretrained(path).to(device)
    elif (path / layout.DENOISER).is_dir() and (path / layout.ENCODERS_JSON).is_file():
        pipe = load_from_bundle(path, params, device)
    else:
        if params is None:
            raise McdmError(f"{path}: a models/ folder needs the params it was trained with (--params params.yaml)")
        if (path / layout.MODELS_LAYOUT[layout.DENOISER][0]).is_dir() or (path / "base").is_dir():
            pipe = load_from_models_dir(path, params, device=device)
        elif (path / layout.DENOISER).is_dir() and (path.parent / "base").is_dir():  # a stage-3 folder
            pipe = load_from_models_dir(path.parent, params, overrides={layout.DENOISER: path / layout.DENOISER},
                                        device=device)
        else:
            raise McdmError(f"{checkpoint}: not a models/ folder, a registered MCDM bundle or a pipeline folder")
    pipe.register_to_config(provenance={**pipe.config.provenance, "source": str(checkpoint)})
    return pipe


def _load_pretrained(path: Path) -> MCDMPipeline:
    """``MCDMPipeline.from_pretrained`` without diffusers' "Loading pipeline components" bar."""
    from diffusers.utils import logging as diffusers_logging

    quiet = not diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        return MCDMPipeline.from_pretrained(str(path), use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise McdmError(f"{path}: cannot load the pipeline ({str(err).splitlines()[0][:200]})") from None
    finally:
        if not quiet:
            diffusers_logging.enable_progress_bar()


def export_pipeline(models_dir: str | Path, params: Params, out_dir: str | Path,
                    overrides: Optional[dict] = None) -> Path:
    """Save the assembled pipeline as one ``save_pretrained`` folder; written to ``<out>.tmp`` and renamed."""
    pipe = load_from_models_dir(models_dir, params, overrides)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out
