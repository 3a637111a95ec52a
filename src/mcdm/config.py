"""The params schema: the one place where every parameter and its default lives.

``params.yaml`` (what DVC tracks) is this schema's defaults, optionally overlaid with
``configs/micro.yaml`` (tests) or ``configs/paper.yaml`` (GPU), written by
``mcdm params apply <profile>``. Every stage validates ``params.yaml`` first; an unknown key, a wrong
type or an out-of-range value stops it with one line naming the key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Variant = Literal["full", "wo_fa", "wo_fpc", "wo_mta", "b1", "b2"]
VARIANTS: tuple[str, ...] = ("full", "wo_fa", "wo_fpc", "wo_mta", "b1", "b2")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataParams(Section):
    source: str = Field("data/sample", description="folder of raw videos; data/sample is what sample_data writes")
    fps: float = Field(25.0, gt=0, description="every clip is resampled to this frame rate")
    audio_rate: int = Field(16000, gt=0, description="every clip's audio is resampled to this rate, mono")
    max_clip_seconds: float = Field(30.0, gt=0, description="clips are trimmed to at most this long")
    min_clip_seconds: float = Field(2.0, ge=0, description="shorter clips are rejected")
    scene_detector: Literal["content", "adaptive"] = "adaptive"
    scene_threshold: float = Field(3.0, gt=0, description="PySceneDetect threshold (adaptive_threshold or content threshold)")
    resolution: int = Field(64, ge=16, description="side of the square talking-head crop")
    min_face_px: int = Field(48, ge=8, description="smallest accepted face box side, in source pixels")
    face_detector: Literal["dlib", "scrfd"] = "dlib"
    scrfd_path: Optional[str] = Field(None, description="local SCRFD ONNX file when face_detector: scrfd")
    face_sample_every: int = Field(5, ge=1, description="run the detector on every k-th frame")
    min_face_frame_rate: float = Field(0.9, ge=0, le=1, description="fraction of sampled frames that must hold exactly one face")
    workers: int = Field(2, ge=1, description="Dask LocalCluster worker processes")
    dask_address: Optional[str] = Field(None, description="an existing Dask scheduler instead of a LocalCluster")


class SampleParams(Section):
    n_videos: int = Field(40, ge=1)
    seconds_min: float = Field(6.0, gt=0)
    seconds_max: float = Field(15.0, gt=0)
    n_long: int = Field(2, ge=0, description="long clean videos for the long-term curve (exempt from trimming)")
    long_seconds: float = Field(60.0, gt=0)
    size: int = Field(256, ge=64, description="frame side of the generated raw videos")
    seed: int = 0


class QualityParams(Section):
    backend: Literal["classical", "hyperiqa"] = "classical"
    hyperiqa_path: Optional[str] = None
    min_resolution: int = Field(96, ge=1, description="shorter side of the source face box, pixels")
    min_sharpness: float = Field(20.0, ge=0, description="variance of the Laplacian on the face crop")
    min_brightness: float = Field(40.0, ge=0, le=255)
    max_brightness: float = Field(220.0, ge=0, le=255)
    max_blockiness: float = Field(1.6, gt=0, description="8x8 boundary / interior gradient ratio")


class SyncNetParams(Section):
    weights: Optional[str] = Field(None, description="official SyncNet weights (local path); else trained here")
    train_steps: int = Field(600, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    max_offset: int = Field(15, ge=1, description="offset search range in frames (+-)")
    max_abs_offset: int = Field(3, ge=0, description="reject clips whose |AV offset| exceeds this")
    min_confidence: float = Field(0.5, ge=0, description="reject clips whose Sync-C is below this")


class SplitParams(Section):
    test_fraction: float = Field(0.1, gt=0, lt=1)
    open_set_identities: int = Field(2, ge=0, description="identities held out entirely for the open-set table")


class BaseModelsParams(Section):
    vae_path: Optional[str] = Field(None, description="SD-1.5 VAE folder (diffusers format)")
    unet_path: Optional[str] = Field(None, description="SD-1.5 UNet folder (diffusers format)")
    wav2vec2_path: Optional[str] = None
    clip_path: Optional[str] = None
    vae_steps: int = Field(1500, ge=0)
    vae_psnr_threshold: float = Field(24.0, description="held-out reconstruction PSNR the tiny VAE must reach")
    unet_steps: int = Field(800, ge=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)


class ModelParams(Section):
    clip_frames: int = Field(8, ge=2, description="frames per present clip (16 at paper scale)")
    archived_frames: int = Field(4, ge=1, description="a: archived frames (16 at paper scale)")
    num_queries: int = Field(4, ge=1, description="n: learnable queries of frame-aligned attention")
    prior_dim: int = Field(64, ge=8, description="d: token width of the motion priors")
    patch_size: int = Field(2, ge=1, description="patchify stride; m = (latent side / patch)^2")
    prior_layers: int = Field(2, ge=1, description="L: blocks of the present-clip prior (8 at paper scale)")
    prior_heads: int = Field(4, ge=1)
    mta_features: int = Field(32, ge=4, description="FAVOR+ random features")
    p_drop_landmarks: float = Field(0.5, ge=0, le=1)
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    gradient_checkpointing: bool = False


class StageParams(Section):
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(2, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    clips_per_run: int = Field(1, ge=1, description="stage 3: consecutive clips with memory carried")


class TrainParams(Section):
    deepspeed_config: str = "configs/deepspeed/zero2_cpu.json"
    checkpoint_every: int = Field(50, ge=1)
    deterministic: bool = True
    ema: bool = False
    stage1: StageParams = Field(default_factory=StageParams)
    stage2: StageParams = Field(default_factory=StageParams)
    stage3: StageParams = Field(default_factory=lambda: StageParams(clips_per_run=2))


class EvalParams(Section):
    steps: int = Field(10, ge=1, description="DDIM steps at generation")
    long_term_seconds: float = Field(40.0, gt=0)
    max_test_clips: int = Field(8, ge=1)
    inception_path: Optional[str] = None
    i3d_path: Optional[str] = None
    deep3d_path: Optional[str] = None


class AblationParams(Section):
    variants: list[Variant] = Field(default_factory=lambda: ["wo_fa", "wo_fpc", "wo_mta", "b1", "b2"])
    seeds: list[int] = Field(default_factory=lambda: [0, 1])


class SweepParams(Section):
    alphas: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])


class RegistryParams(Section):
    name: str = "mcdm-talkingface"
    primary_metric: str = "fvd"
    lower_is_better: bool = True


class TrackingParams(Section):
    experiment: str = "mcdm"


class Params(Section):
    alpha: float = Field(0.1, ge=0, le=1, description="Eq. 5 memory update rate")
    variant: Variant = "full"
    seed: int = 0
    data: DataParams = Field(default_factory=DataParams)
    sample: SampleParams = Field(default_factory=SampleParams)
    quality: QualityParams = Field(default_factory=QualityParams)
    syncnet: SyncNetParams = Field(default_factory=SyncNetParams)
    split: SplitParams = Field(default_factory=SplitParams)
    base_models: BaseModelsParams = Field(default_factory=BaseModelsParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    ablations: AblationParams = Field(default_factory=AblationParams)
    sweep: SweepParams = Field(default_factory=SweepParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    def hash(self) -> str:
        """Short, stable hash of the validated params (tags runs and report rows)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class ParamsError(ValueError):
    """Invalid params: ``str(err)`` is one line naming the offending key."""


PROFILES = ("default", "micro", "paper")


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    got_s = "" if first["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{got_s}{more}"


def validate(raw: dict[str, Any] | None, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_one_line(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found (run `mcdm params apply default`)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return validate(raw, str(path))


def deep_merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for k, v in overlay.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def profile_params(profile: str, configs_dir: str | Path = "configs") -> Params:
    """Defaults overlaid with ``configs/<profile>.yaml`` (``default`` is the schema alone)."""
    if profile not in PROFILES:
        raise ParamsError(f"profile: unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    base = Params().model_dump(mode="json")
    if profile != "default":
        overlay_path = Path(configs_dir) / f"{profile}.yaml"
        overlay = yaml.safe_load(overlay_path.read_text()) or {}
        base = deep_merge(base, overlay)
        return validate(base, str(overlay_path))
    return validate(base, "defaults")


def dump_params(params: Params) -> str:
    header = (
        "# Written by `mcdm params apply` from the schema in src/mcdm/config.py (the one place defaults live).\n"
        "# Edit freely or use `dvc exp run -S key=value`; every stage validates this file first.\n"
    )
    return header + yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def apply_profile(profile: str, out: str | Path = "params.yaml", configs_dir: str | Path = "configs") -> Params:
    params = profile_params(profile, configs_dir)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(dump_params(params))
    tmp.replace(out)
    return params
