"""The folder layout of the models: the one place that names the folders the DVC stages write under
``models/`` and the folders of the bundle stage 3 registers in MLflow.

``models/`` (paths relative to it; each stage writes its folder to ``<out>.tmp`` and renames it)::

    base/                   base_models: the frozen VAE and the SD-shaped UNet (+ scheduler, encoders)
      vae/                  diffusers AutoencoderKL (save_pretrained)
      unet/                 diffusers UNet2DConditionModel, SD-1.5 layout
      ref_tokens/           ReferenceTokens (only when the UNet was pretrained here)
      scheduler/            DDPMScheduler config (SD-1.5's training schedule)
      audio_encoder/        Wav2Vec2Model (only with base_models.wav2vec2_path)
      image_encoder/        CLIPVisionModelWithProjection (only with base_models.clip_path)
      encoders.json         which audio / identity backend is used, their dims and sources
    motion_encoders/        head/, lip/, lip_audio/, expression/ + metrics.json
    stage1/                 denoiser/, landmark_guider/, stage.json
    stage2/                 motion_prior/ (wo_fpc: audio_tokens/), stage.json
    stage3/                 denoiser/, stage.json
    syncnet/                the SyncNet of the sync filter and of Sync-C / Sync-D

The registered bundle holds what generation needs in one folder: ``vae/``, ``scheduler/``,
``encoders.json``, ``denoiser/``, ``motion_prior/`` (or ``audio_tokens/``), ``landmark_guider/``,
``motion_encoders/``, ``stage{1,2,3}.json`` and the ``params.yaml`` that trained it.
"""
from __future__ import annotations

import json
from pathlib import Path

from mcdm.errors import McdmError, MissingStageOutput

# models/base/
BASE_STAGE = "base_models"
VAE, UNET, REF_TOKENS, SCHEDULER = "vae", "unet", "ref_tokens", "scheduler"
AUDIO_ENCODER, IMAGE_ENCODER = "audio_encoder", "image_encoder"
ENCODERS_JSON = "encoders.json"

# the training stages' exports
STAGE_JSON = "stage.json"
DENOISER, LANDMARK_GUIDER, MOTION_PRIOR, AUDIO_TOKENS = "denoiser", "landmark_guider", "motion_prior", "audio_tokens"
MOTION_ENCODERS = "motion_encoders"
HEAD_ENCODER = "motion_encoders/head"

# A models/ folder as the DVC stages write it: component -> (subfolder, stage that writes it).
MODELS_LAYOUT = {
    "base": ("base", BASE_STAGE),
    LANDMARK_GUIDER: (f"stage1/{LANDMARK_GUIDER}", "train_stage1"),
    MOTION_PRIOR: (f"stage2/{MOTION_PRIOR}", "train_stage2"),
    AUDIO_TOKENS: (f"stage2/{AUDIO_TOKENS}", "train_stage2"),
    DENOISER: (f"stage3/{DENOISER}", "train_stage3"),
    "head_encoder": (HEAD_ENCODER, MOTION_ENCODERS),
}
# The bundle stage 3 registers: component -> subfolder ("." : the bundle itself holds vae/, scheduler/, ...).
BUNDLE_LAYOUT = {"base": ".", DENOISER: DENOISER, MOTION_PRIOR: MOTION_PRIOR, AUDIO_TOKENS: AUDIO_TOKENS,
                 LANDMARK_GUIDER: LANDMARK_GUIDER, "head_encoder": HEAD_ENCODER}
BUNDLE_PARAMS = "params.yaml"
# The registered MLflow model (a pyfunc, decisions.md #28): the bundle is its artifact named PYFUNC_ARTIFACT.
MLMODEL, PYFUNC_ARTIFACT = "MLmodel", "bundle"


def bundle_stage_json(stage: int) -> str:
    """The name of stage ``stage``'s ``stage.json`` inside the bundle."""
    return f"stage{stage}.json"


def base_path(base_dir: str | Path, name: str) -> Path:
    """``<base_dir>/<name>`` of the base models; a one-line error naming the stage to run when absent."""
    path = Path(base_dir) / name
    if not path.exists():
        raise MissingStageOutput(path, BASE_STAGE)
    return path


def read_encoders(base_dir: str | Path) -> dict:
    """``encoders.json``: ``{"audio": {"backend", "dim", "source"}, "image": {...}, "vae": {...}, "unet": {...}}``."""
    path = base_path(base_dir, ENCODERS_JSON)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise McdmError(f"{path}: not valid JSON ({err})") from None


def frozen_encoder_paths(base_dir: str | Path) -> dict:
    """What :func:`mcdm.models.frozen.load_frozen_encoders` needs for the backends ``encoders.json``
    names: the VAE folder, the backends and, for the weight-backed ones, their folders."""
    encoders = read_encoders(base_dir)
    audio, image = encoders["audio"]["backend"], encoders["image"]["backend"]
    return {
        "vae_dir": base_path(base_dir, VAE),
        "audio_backend": audio,
        "audio_dir": base_path(base_dir, AUDIO_ENCODER) if audio == "wav2vec2" else None,
        "image_backend": image,
        "image_dir": base_path(base_dir, IMAGE_ENCODER) if image == "clip" else None,
    }


def read_stage_json(path: str | Path) -> dict:
    """A stage's ``stage.json`` (a file path, or the stage's output folder); ``{}`` when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / STAGE_JSON
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise McdmError(f"{path}: not valid JSON ({err})") from None


def models_paths(models_dir: str | Path, overrides: dict | None = None) -> dict[str, Path]:
    """Component -> folder of a ``models/`` folder laid out as the stages write it (``MODELS_LAYOUT``);
    ``overrides`` maps a component to another folder (e.g. an ablation member's stage-3 denoiser)."""
    paths = {name: Path(models_dir) / sub for name, (sub, _) in MODELS_LAYOUT.items()}
    paths.update({k: Path(v) for k, v in (overrides or {}).items()})
    return paths


def bundle_paths(bundle_dir: str | Path) -> dict[str, Path]:
    """Component -> folder of a registered bundle (``BUNDLE_LAYOUT``)."""
    return {name: Path(bundle_dir) / sub for name, sub in BUNDLE_LAYOUT.items()}


def missing_component(path: Path | None, component: str) -> MissingStageOutput:
    """The one-line error for a component folder that is not there, naming the stage that writes it."""
    return MissingStageOutput(path or component, MODELS_LAYOUT[component][1])


def pyfunc_bundle(folder: str | Path) -> Path | None:
    """The bundle inside a downloaded MLflow pyfunc model folder (its ``MLmodel`` names the artifact's
    path), or None when ``folder`` is not one."""
    import yaml

    mlmodel = Path(folder) / MLMODEL
    if not mlmodel.is_file():
        return None
    try:
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        path = flavor["artifacts"][PYFUNC_ARTIFACT]["path"]
    except (yaml.YAMLError, KeyError, TypeError, AttributeError):
        raise McdmError(f"{mlmodel}: an MLflow model without a {PYFUNC_ARTIFACT!r} artifact: not an MCDM model") from None
    return Path(folder) / path
