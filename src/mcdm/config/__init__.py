"""The params schema: the one place where every parameter and its default lives.

``params.yaml`` (what DVC tracks) is this schema's defaults, optionally overlaid with
``configs/micro.yaml`` (tests), ``configs/paper.yaml`` (GPU) or ``configs/quality.yaml`` (128 px, issue #20), written by
``mcdm params apply <profile>``. The evaluation sections live in ``mcdm.config.evaluation``. Every stage validates ``params.yaml`` first; an unknown key, a wrong
type or an out-of-range value stops it with one line naming the key (a section that decisions.md #18's
map moved, with where it went: ``MOVED``).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError

from mcdm.config.evaluation import (
    AblationParams,
    ClaimsParams,
    EvalParams,
    OpenSetParams,
    SweepParams,
    TokenFiguresParams,
)
from mcdm.config.section import VARIANTS, Section, Variant


class QualityParams(Section):
    backend: Literal["classical", "hyperiqa"] = "classical"
    hyperiqa_path: Optional[str] = None
    min_resolution: int = Field(96, ge=1, description="shorter side of the source face box, pixels")
    min_sharpness: float = Field(35.0, ge=0, description="variance of the Laplacian of the face resized to analysis_px")
    min_brightness: float = Field(40.0, ge=0, le=255)
    max_brightness: float = Field(220.0, ge=0, le=255)
    max_blockiness: float = Field(1.6, gt=0, description="8x8 boundary / interior gradient ratio")
    analysis_px: int = Field(128, ge=16, description="face region is resized to this side before measuring sharpness")
    sample_frames: int = Field(16, ge=1, description="frames per clip measured (evenly spaced)")
    min_iqa_score: float = Field(40.0, description="hyperiqa backend: smallest accepted median score (0-100)")


class SyncNetParams(Section):
    weights: Optional[str] = Field(
        None, description="official SyncNet weights (local path: syncnet_v2.model, or a save_pretrained folder); "
        "else the SyncNet trained by syncnet_train is used")
    # the SyncNet trained here (audio MFCC 13x20 window vs 5 grayscale mouth crops, Chung & Zisserman 2017)
    mouth_height: int = Field(32, ge=8, description="mouth crop height fed to the trained SyncNet, pixels")
    mouth_width: int = Field(48, ge=8, description="mouth crop width fed to the trained SyncNet, pixels")
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 128],
                                description="conv widths of the audio and video streams (each stage halves the map)")
    embed_dim: int = Field(128, ge=8, description="width of the L2-normalised embedding")
    train_steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=2, description="in-sync pairs per step (as many shifted pairs are added)")
    lr: float = Field(1e-3, gt=0)
    margin: float = Field(1.0, gt=0, description="contrastive-loss margin on the embedding distance")
    min_shift: int = Field(3, ge=1, description="smallest |audio shift| in frames of a negative (shifted) pair")
    holdout_fraction: float = Field(0.15, ge=0, lt=1, description="clips (by source) held out to report sync accuracy/AUC")
    # offset search and filter (the standard SyncNet algorithm; also Sync-C / Sync-D in evaluation)
    max_offset: int = Field(15, ge=1, description="offset search range in frames (+-)")
    max_abs_offset: int = Field(3, ge=0, description="reject clips whose |AV offset| exceeds this")
    min_confidence: float = Field(
        0.2, ge=0, description="reject clips whose Sync-C is below this (distance units of the SyncNet trained here)")
    min_confidence_official: float = Field(
        3.0, ge=0, description="the same cut when `weights` (official SyncNet, unnormalised 1024-d embeddings) is used")


class SplitParams(Section):
    test_fraction: float = Field(0.1, gt=0, lt=1)
    open_set_identities: int = Field(2, ge=0, description="identities held out entirely for the open-set table")
    seed: int = Field(0, description="salt of the deterministic group hash (independent of the training seed)")


class DataParams(Section):
    source: str = Field("data/sample", description="folder of raw videos; data/sample is what sample_data writes")
    fps: float = Field(25.0, gt=0, description="every clip is resampled to this frame rate")
    audio_rate: int = Field(16000, gt=0, description="every clip's audio is resampled to this rate, mono")
    max_clip_seconds: float = Field(30.0, gt=0, description="clips are trimmed to at most this long")
    min_clip_seconds: float = Field(2.0, ge=0, description="shorter clips are rejected")
    scene_detector: Literal["content", "adaptive"] = "adaptive"
    scene_threshold: float = Field(3.0, gt=0, description="PySceneDetect threshold (adaptive_threshold or content threshold)")
    resolution: int = Field(64, ge=16, description="side of the square talking-head crop")
    min_face_px: int = Field(80, ge=8, description="smallest accepted face box side, in source pixels (dlib detects at 80 / min_face_px scale)")
    face_detector: Literal["dlib", "scrfd"] = "dlib"
    scrfd_path: Optional[str] = Field(None, description="local SCRFD ONNX file when face_detector: scrfd")
    face_sample_every: int = Field(5, ge=1, description="run the detector on every k-th frame")
    min_face_frame_rate: float = Field(0.9, ge=0, le=1, description="fraction of a kept face run's sampled frames that must hold exactly one face")
    workers: int = Field(2, ge=1, description="Dask LocalCluster worker processes (1: run in-process) of the stages whose "
                         "per-video work is single-threaded (sample_data, scenes, faces); quality, sync_filter and features "
                         "run in-process unless dask_address is set (mcdm.data.parallel.stage_workers)")
    dask_address: Optional[str] = Field(None, description="an existing Dask scheduler instead of a LocalCluster")
    item_timeout_seconds: float = Field(
        900.0, gt=0, description="a video or clip still being processed after this many seconds (a file that blocks its decoder) becomes a `timeout` reject; the stage goes on")
    silence_dbfs: float = Field(-50.0, le=0, description="audio whose 90th-percentile 0.25 s RMS is below this (dBFS) is silent: rejected")
    cut_margin_frames: int = Field(2, ge=0, description="frames dropped on each side of a detected scene cut")
    detect_max_side: int = Field(640, ge=64, description="longest side of the image the face detector sees (larger frames are downscaled)")
    max_multi_face_rate: float = Field(0.2, ge=0, le=1, description="a clip with 2+ faces in this fraction of sampled frames is rejected whole")
    max_face_gap_seconds: float = Field(0.5, ge=0, description="longer stretches without exactly one face split the clip (shorter ones are interpolated)")
    max_face_jump: float = Field(0.5, gt=0, description="a face centre moving more than this x face size between samples splits the clip")
    crop_scale: float = Field(1.8, ge=1, description="side of the square talking-head crop / face box side")
    box_smooth_seconds: float = Field(0.3, ge=0, description="Gaussian sigma smoothing the face box over time")
    landmark_smooth_frames: float = Field(1.0, ge=0, description="Gaussian sigma smoothing landmarks over time (0: raw)")
    # the filters after faces (dvc.yaml stages quality, syncnet_train / sync_filter, split); the stages
    # before them list the keys above one by one, so changing a filter re-runs only what follows it
    quality: QualityParams = Field(default_factory=QualityParams)
    syncnet: SyncNetParams = Field(default_factory=SyncNetParams)
    split: SplitParams = Field(default_factory=SplitParams)


class SampleParams(Section):
    """talkingface-wild-mini, the embedded sample dataset (``mcdm sample-data``)."""

    n_videos: int = Field(36, ge=1, description="regular videos (14 carry a planted defect, at least one of each kind; the rest are clean)")
    seconds_min: float = Field(6.0, gt=0, description="shortest regular video, seconds (before time_scale)")
    seconds_max: float = Field(12.0, gt=0, description="longest regular video, seconds (before time_scale)")
    time_scale: float = Field(1.0, gt=0, description="multiplies every duration (`mcdm sample-data --seconds`)")
    too_long_seconds: float = Field(34.0, gt=0, description="length of the planted too-long videos (never below 31 s)")
    n_long: int = Field(2, ge=0, description="long clean videos for the long-term curve (exempt from trimming)")
    long_seconds: float = Field(31.0, gt=0, description="length of the long videos, seconds (before time_scale): at least the 30 s every matrix member generates of them (ablations.eval.long_term_seconds); the main line's curve uses eval.long_term_seconds")
    n_identities: int = Field(10, ge=2, le=10, description="identities used (2 real photos + derived faces)")
    size: int = Field(256, ge=128, description="frame side of the generated raw videos (two-face videos are twice as wide)")
    fps: float = Field(25.0, gt=0, description="frame rate of the generated videos")
    seed: int = 0


class BaseModelsParams(Section):
    """Base models (decisions.md #1, #2): paper weights from local folders, else tiny ones pretrained here."""

    vae_path: Optional[str] = Field(None, description="SD-1.5 VAE folder (diffusers format)")
    unet_path: Optional[str] = Field(None, description="SD-1.5 UNet folder (diffusers format)")
    wav2vec2_path: Optional[str] = Field(None, description="Wav2Vec 2.0 folder (transformers format); else the logmel audio backend")
    clip_path: Optional[str] = Field(None, description="CLIP vision folder (transformers format); else the dlib+vae identity backend")
    # the tiny VAE (diffusers AutoencoderKL), trained on the training frames when vae_path is not given
    vae_block_out_channels: list[int] = Field(
        default_factory=lambda: [8, 16, 32, 64],
        description="tiny VAE widths; n blocks downsample by 2^(n-1) (4 blocks: 64 px -> 8x8 latent, as SD's h/8)")
    vae_layers_per_block: int = Field(1, ge=1, description="tiny VAE resnets per block")
    vae_norm_num_groups: int = Field(2, ge=1, description="tiny VAE GroupNorm groups (must divide every width; few groups keep colour)")
    vae_latent_channels: int = Field(4, ge=1, description="latent channels (4, as SD)")
    vae_steps: int = Field(500, ge=1, description="most tiny-VAE steps (cosine learning-rate schedule over them)")
    vae_min_steps: int = Field(
        500, ge=0, description="tiny-VAE steps before training may stop early at the first PSNR check that passes")
    vae_psnr_threshold: float = Field(19.0, description="held-out reconstruction PSNR (dB) the tiny VAE must reach, else the stage fails")
    vae_eval_every: int = Field(100, ge=1, description="steps between held-out PSNR checks")
    vae_kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term (SD's VAE uses ~1e-6)")
    vae_edge_weight: float = Field(0.5, ge=0, description="weight of the L1 loss on image gradients (sharper edges)")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="training clips held out to measure the VAE / UNet")
    max_frames: int = Field(4000, ge=16, description="most training frames read for pretraining (evenly spaced per clip)")
    # the tiny SD-shaped UNet, pretrained as a reference-conditioned image denoiser when unet_path is not given
    unet_steps: int = Field(600, ge=1, description="UNet pretraining steps")
    unet_lr: float = Field(1e-3, gt=0, description="learning rate of the UNet pretraining")
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction", description="what the pretrained tiny UNet predicts (SD-1.5: epsilon, SD-2: v); written to "
        "models/base/scheduler and read by every later stage; with unet_path, the scheduler beside it decides")
    min_snr_gamma: Optional[float] = Field(
        None, gt=0, description="Min-SNR-gamma weighting of the UNet pretraining loss (Hang et al. 2023, e.g. 5); null: unweighted")
    unet_batch_size: int = Field(16, ge=1, description="frames per UNet pretraining step")
    batch_size: int = Field(8, ge=1, description="frames per tiny-VAE step")
    lr: float = Field(6e-3, gt=0, description="peak learning rate of the tiny VAE (AdamW, gradients clipped at norm 1)")
    threads: int = Field(2, ge=1, description="torch CPU threads for pretraining and features")


class ModelParams(Section):
    clip_frames: int = Field(8, ge=2, description="frames per present clip (16 at paper scale)")
    archived_frames: int = Field(4, ge=1, description="a: archived frames (16 at paper scale)")
    num_queries: int = Field(16, ge=1, description="n: learnable queries of frame-aligned attention (16 as in the paper; "
                             "the reference-token warm start needs n = m)")
    archived_prior_init: Literal["reference_tokens", "random"] = Field(
        "reference_tokens", description="stage 1's archived-clip prior: reference_tokens = set so that its tokens equal "
        "the base UNet's pretrained reference tokens of each archived frame (models/archived_prior.py; used when "
        "models/base has them, i.e. the UNet was pretrained here; b1/b2 and a UNet given by path start random); "
        "random = Eq. 1-2 from random weights")
    prior_dim: int = Field(64, ge=8, description="d: token width of the motion priors")
    patch_size: int = Field(2, ge=1, description="patchify stride; m = (latent side / patch)^2")
    prior_layers: int = Field(2, ge=1, description="L: blocks of the present-clip prior (8 at paper scale)")
    prior_heads: int = Field(4, ge=1)
    mta_features: int = Field(32, ge=4, description="FAVOR+ random features")
    p_drop_landmarks: float = Field(0.5, ge=0, le=1)
    frame_noise_correlation: float = Field(
        0.8, ge=0, le=1, description="rho: correlation of the diffusion noise between the frames of a clip, in training (stages 1 and 3) and generation (mixed noise model of PYoCo, Ge et al. 2023; models/frame_noise.py); 0 = independent per-frame noise")
    # present-clip motion prior and motion encoders (models/motion_prior.py, models/encoders.py)
    lip_dim: int = Field(16, ge=1, description="width of the lip token (LipEncoder output)")
    expression_dim: int = Field(16, ge=1, description="width of the expression token (ExpressionEncoder bottleneck)")
    lip_window: int = Field(5, ge=1, description="mouth-crop / audio frames in one lip-encoder window")
    audio_window: int = Field(2, ge=0, description="audio frames on each side of a frame in the prior's audio token")
    prior_train_timesteps: int = Field(1000, ge=2, description="steps of the prior's training noise schedule (Eq. 3)")
    prior_beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field("squaredcos_cap_v2", description="beta schedule of the prior's noise scheduler")
    prior_inference_steps: int = Field(20, ge=1, description="DDIM steps when the prior samples motion tokens")
    landmark_guider_channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128], description="landmark guider conv widths; len - 1 stride-2 stages = log2 of the VAE downsampling")
    motion_encoder_steps: int = Field(200, ge=1, description="training steps of the lip encoder and of the expression encoder (motion_encoders stage)")
    motion_encoder_batch_size: int = Field(32, ge=2, description="windows / frames per step in the motion_encoders stage")
    motion_encoder_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the motion_encoders stage")
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = Field(
        8, ge=1, description="attention heads per UNet attention layer (diffusers' legacy name, as in SD-1.5's config: 8)"
    )
    norm_num_groups: int = Field(32, ge=1, description="GroupNorm groups of the UNet (SD-1.5: 32)")
    down_block_types: Optional[list[Literal["CrossAttnDownBlock2D", "DownBlock2D"]]] = Field(
        None, description="UNet down blocks, one per block_out_channels entry, for the pretrained base UNet and the denoiser built from it; null = SD-1.5's layout in base_models (attention at every level but the lowest), CrossAttnDownBlock2D at every level in a denoiser built without a base UNet"
    )
    up_block_types: Optional[list[Literal["CrossAttnUpBlock2D", "UpBlock2D"]]] = Field(
        None, description="UNet up blocks (lowest resolution first), one per block_out_channels entry, as down_block_types"
    )
    frame_attention_heads: int = Field(1, ge=1, description="heads of the frame-aligned attention (1 = Eq. 2 as written)")
    qformer_layers: int = Field(2, ge=1, description="b1: Q-Former layers (self-attn + cross-attn + FF); heads = prior_heads")
    audio_dim: int = Field(
        80, ge=1, description="wo_fpc: width of the per-frame audio features (80 log-mel bins; 768 for wav2vec2-base)"
    )
    gradient_checkpointing: bool = False


class StageParams(Section):
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(2, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    clips_per_run: int = Field(1, ge=1, description="stage 3: consecutive clips with memory carried")
    warmup_steps: int = Field(0, ge=0, description="linear lr warm-up from 0 (DeepSpeed WarmupLR); 0 = constant lr")


# Each stage's defaults are those of the embedded default (64 px, 8-frame clips, 2 CPU cores: the
# three stages take ~5 minutes together). One class per stage, so that overriding one key of a stage
# keeps the stage's other defaults.
class Stage1Params(StageParams):
    """archived-clip prior, archived reference attention, spatial layers, landmark guider"""

    steps: int = Field(100, ge=1, description="100 at the embedded default: from the reference-token warm start, its loss fell 0.220 -> 0.205 over 160 steps")
    lr: float = Field(2e-4, gt=0)


class Stage2Params(StageParams):
    """present-clip motion-prior diffusion model (small, from zero outputs: a larger lr and batch)"""

    steps: int = Field(150, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(4, ge=1)


class Stage3Params(StageParams):
    """present-clip reference attention + MTA, on runs of ``clips_per_run`` clips"""

    steps: int = Field(110, ge=1)
    lr: float = Field(1e-3, gt=0)
    clips_per_run: int = Field(2, ge=1, description="consecutive clips with the memory carried (decisions.md #6)")


class TrainParams(Section):
    deepspeed_config: str = Field("configs/deepspeed/zero2.json", description="DeepSpeed JSON; its \"auto\" fields (batch, lr, clipping, bf16 on GPU / fp32 on CPU) are filled at run time")
    checkpoint_every: int = Field(50, ge=1, description="steps between DeepSpeed checkpoints (also written at the last step)")
    keep_checkpoints: int = Field(2, ge=1, description="newest complete checkpoints kept per stage")
    deterministic: bool = Field(True, description="deterministic algorithms + fixed seeds (bitwise resume on CPU)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    threads: int = Field(2, ge=1, description="torch intra-op CPU threads per training process (idle 2 cores, "
                         "embedded default: 2 threads took stage 1 from 99 to 90 s and stage 3 from 120 to 112 s; OpenMP waits "
                         "passively (src/mcdm/__init__.py), so a busy machine no longer makes them spin)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on a GPU that has it, fp32 on CPU")
    ema: bool = Field(False, description="export an exponential moving average of the trained weights (diffusers EMAModel)")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay (with diffusers' warm-up: min(decay, (1 + n) / (10 + n)))")
    stage1: Stage1Params = Field(default_factory=Stage1Params)
    stage2: Stage2Params = Field(default_factory=Stage2Params)
    stage3: Stage3Params = Field(default_factory=Stage3Params)


class RegistryParams(Section):
    name: str = Field("mcdm-talkingface", description="MLflow registered model; only the main line (variant full, default alpha) adds versions")
    primary_metric: str = Field("fvd", description="metric that decides the champion alias (a key of reports/metrics.json)")
    lower_is_better: bool = True


class TrackingParams(Section):
    experiment: str = Field("mcdm", description="MLflow experiment of every stage run")
    system_metrics: bool = Field(True, description="MLflow system metrics (CPU, memory, disk, network; GPU with pynvml)")
    system_metrics_interval: float = Field(10.0, gt=0, description="seconds between system metrics samples")


class Params(Section):
    alpha: float = Field(0.1, ge=0, le=1, description="Eq. 5 memory update rate")
    variant: Variant = "full"
    seed: int = 0
    data: DataParams = Field(default_factory=DataParams)
    sample: SampleParams = Field(default_factory=SampleParams)
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


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-5`` is a number (YAML 1.1, PyYAML's default,
    reads it as a string, and the strict schema would refuse it), as other tools (DVC's ``-S``) write it."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def read_yaml(text: str):
    """YAML as the params are read everywhere (YAML 1.2 floats)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 -- a SafeLoader subclass


class ParamsError(ValueError):
    """Invalid params: ``str(err)`` is one line naming the offending key."""


PROFILES = ("default", "micro", "paper", "quality")

# Sections that were top level before the params map of decisions.md #18: an old params.yaml or profile
# naming one stops with where it went (rather than pydantic's "unknown key").
MOVED = {"quality": "data.quality", "syncnet": "data.syncnet", "split": "data.split",
         "open_set": "eval.open_set", "token_figures": "eval.token_figures"}
# The sub-sections of `data` that only the filter stages read (not a trained pipeline's clip format).
DATA_FILTERS = ("quality", "syncnet", "split")


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    got_s = "" if first["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{got_s}{more}"


def _moved(raw: Any, source: str) -> Optional[str]:
    moved = [k for k in MOVED if isinstance(raw, dict) and k in raw]
    if not moved:
        return None
    return f"{source}: " + "; ".join(f"{k}: moved to {MOVED[k]}" for k in moved) + " (decisions.md #18)"


def validate(raw: dict[str, Any] | None, source: str = "params") -> Params:
    moved = _moved(raw, source)
    if moved:
        raise ParamsError(moved)
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_one_line(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found (run `mcdm params apply default`)")
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if raw is None:
        raise ParamsError(f"{path}: the file is empty (run `mcdm params apply default`)")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return validate(raw, str(path))


def deep_merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for k, v in overlay.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_overrides(params: Params, assignments: list[str], source: str = "--set") -> Params:
    """``params`` with ``key.sub=value`` assignments (values parsed as YAML) applied and validated."""
    overlay: dict = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"{source} {item!r}: expected KEY=VALUE")
        node = overlay
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = read_yaml(value)
    return validate(deep_merge(params.model_dump(mode="json"), overlay), source) if overlay else params


def profile_params(profile: str, configs_dir: str | Path = "configs") -> Params:
    """Defaults overlaid with ``configs/<profile>.yaml`` (``default`` is the schema alone)."""
    if profile not in PROFILES:
        raise ParamsError(f"profile: unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    base = Params().model_dump(mode="json")
    if profile != "default":
        overlay_path = Path(configs_dir) / f"{profile}.yaml"
        overlay = read_yaml(overlay_path.read_text()) or {}
        base = deep_merge(base, overlay)
        return validate(base, str(overlay_path))
    return validate(base, "defaults")


def dump_params(params: Params) -> str:
    header = (
        "# Written by `mcdm params apply` from the schema in src/mcdm/config/ (the one place defaults live).\n"
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
