"""The evaluation sections of the params schema: ``eval`` (with ``eval.open_set``, ``eval.token_figures``,
``eval.claims``), ``ablations`` and ``sweep`` (decisions.md #18's map; re-exported by ``mcdm.config``)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, ValidationError, field_validator

from mcdm.config.section import Section, Variant


class OpenSetParams(Section):
    """The open-set table (decisions.md #23; dvc.yaml stage ``open_set``): portraits of the identities the
    split held out (``data.split.open_set_identities``) speaking held-out audio, generated and measured with
    the main line's ``eval`` settings. ``eval.open_set``: no other stage lists it in dvc.yaml, so that
    changing it re-runs only that stage."""

    max_pairs: int = Field(8, ge=1, description="portrait x audio rows of data/split/open_set.parquet generated "
                           "and measured (in portrait clip order)")
    fid_real_frames: int = Field(200, ge=2, description="training frames in FID's real set (evenly spaced over the "
                                 "train clips of data/features); the dlib descriptor costs ~0.15 s of CPU per frame")


class TokenFiguresParams(Section):
    """The lip-token heatmap and the t-SNE of expression tokens (Figure 6; dvc.yaml stage ``token_figures``;
    ``eval.token_figures``)."""

    heatmap_clips: int = Field(2, ge=1, description="test clips in the lip-token heatmap (regular clips first)")
    heatmap_seconds: float = Field(4.0, gt=0, description="seconds of each heatmap clip shown (capped by the clip)")
    tsne_frames_per_clip: int = Field(40, ge=1, description="frames per test / open-set clip (evenly spaced) whose "
                                      "expression tokens enter the t-SNE")
    tsne_perplexity: float = Field(30.0, gt=0, description="t-SNE perplexity (lowered to n_points - 1 when fewer points)")


class ClaimsParams(Section):
    """The paper's claims answered with confidence intervals (dvc.yaml stage ``claims``; ``eval.claims``;
    ``mcdm.eval.statistics``): percentile bootstrap over clips x seeds, two-level by seed when there are
    several seeds."""

    level: float = Field(0.95, gt=0, lt=1, description="confidence level of every interval")
    n_boot: int = Field(2000, ge=100, description="bootstrap resamples of per-clip metrics (SSIM, Sync-C/D, identity)")
    set_level_boot: int = Field(500, ge=100, description="bootstrap resamples of set-level metrics (FID, FVD, E-FID: "
                                "the Fréchet distance is recomputed on each resample of clips)")
    power: float = Field(0.8, gt=0, lt=1, description="power at which the report states how many clips x seeds the "
                         "observed effect would need (statistics.required_n)")
    min_units: int = Field(4, ge=2, description="a claim resting on fewer (clip, seed) units stays inconclusive: a "
                           "percentile interval of 2-3 values is about their range, far too optimistic")
    seed: int = Field(0, description="seed of the bootstrap resampling")


class EvalParams(Section):
    steps: int = Field(10, ge=1, description="DDIM steps at generation")
    long_term_seconds: float = Field(8.0, gt=0, description="length of the long-term sequence (capped by its long test clip; 288 s = 7200 frames in the paper profile)")
    max_test_clips: int = Field(8, ge=1, description="test clips generated and measured")
    inception_path: Optional[str] = Field(None, description="StyleGAN-family TorchScript Inception (inception-2015-12-05.pt) for FID; else the dlib-descriptor-128 fallback")
    i3d_path: Optional[str] = Field(None, description="StyleGAN-V TorchScript I3D (i3d_torchscript.pt) for FVD; else the dlib landmark-dynamics fallback")
    deep3d_path: Optional[str] = Field(None, description="TorchScript export of Deep3DFaceRecon's R-Net (257 coefficients) for E-FID; else landmark-expression-offsets")
    fvd_clip_frames: int = Field(16, ge=2, description="frames per FVD clip (non-overlapping clips of each video)")
    fvd_fallback_descriptor_every: int = Field(4, ge=1, description="FVD fallback: dlib descriptor on every k-th frame of a clip (landmarks on all)")
    frame_stride: int = Field(2, ge=1, description="FID, E-FID and identity use every k-th frame of each video (FVD and SSIM use all); the dlib descriptor costs ~0.15 s of CPU per frame")
    dlib_min_side: int = Field(160, ge=32, description="frames smaller than this are upscaled (integer factor) before dlib face analysis")
    parallel_faces_min_frames: int = Field(300, ge=1, description="dlib face analysis of the test set runs in data.workers Dask processes when at least this many frames need it (a cluster costs seconds to start); fewer: in-process")
    drift_tail: float = Field(0.1, gt=0, le=0.5, description="identity drift = mean of the last this-fraction of frames minus the first")
    # generation of the test set (mcdm evaluate)
    clip_seconds: Optional[float] = Field(2.0, gt=0, description="each test clip is generated for at most this many seconds (null: the whole clip)")
    batch_size: int = Field(4, ge=1, description="test clips generated together in one batch")
    threads: int = Field(2, ge=1, description="torch CPU threads of generation and metrics")
    use_landmarks: bool = Field(False, description="drive generation with the ground truth's landmarks (the paper's default is without)")
    n_samples: int = Field(2, ge=0, description="generated test clips written as sample mp4s (with their audio)")
    grid_clips: int = Field(4, ge=1, description="test clips (rows) in the frame grid")
    grid_times: int = Field(4, ge=1, description="times per clip in the frame grid (ground truth and generated side by side)")
    # long-term curve (Figure 5) on the long_term-flagged test clips
    long_term_clips: int = Field(1, ge=0, description="long-term test clips generated together (the curve is their mean; the windows are per clip); 0: no long-term curve")
    long_term_every: int = Field(8, ge=1, description="long-term curve: one row per this many frames (SSIM averaged over them, identity on the first)")
    long_term_window_seconds: float = Field(5.0, gt=0, description="the long-term metrics per time window of this length (SSIM, identity, face failures, Sync-C/D)")
    # the stages beyond the main line (dvc.yaml stages open_set, token_figures, claims); evaluate and the matrix
    # list the keys above one by one, so changing these re-runs only their own stage
    open_set: OpenSetParams = Field(default_factory=OpenSetParams)
    token_figures: TokenFiguresParams = Field(default_factory=TokenFiguresParams)
    claims: ClaimsParams = Field(default_factory=ClaimsParams)


class AblationParams(Section):
    """The ablation matrix (paper Tables 4-5; dvc.yaml stage ``ablation``) and what every matrix member
    (ablation or sweep, ``mcdm ablate``) costs. A member retrains only the stages its variant changes
    and takes the others from the main line (decisions.md #10)."""

    variants: list[Variant] = Field(
        default_factory=lambda: ["full", "wo_fa", "wo_fpc", "wo_mta", "b1", "b2"],
        description="variants of the matrix; `full` is the full model retrained at the members' budget (the tables' reference row)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="training seeds of the matrix; every member "
                             "generates with its seed, so the members of a seed see the same noise (the claims pair them); "
                             "[0, 1, 2, 3, 4] for narrower intervals (claims.md says how many the observed effects need)")
    alpha: float = Field(0.1, ge=0, le=1, description="Eq. 5 alpha of the ablation members (Tables 4-5: the paper's 0.1); "
                         "the main line reads `alpha`, the sweep `sweep.alphas`")
    steps_fraction: float = Field(
        0.1, gt=0, le=1, description="fraction of train.stageN.steps (and warm-up) a member trains in each stage it "
        "retrains (at least 1 step); `full` members too, so a `full` member is NOT the main line (0.1 at the embedded "
        "default so that 21 members fit the 40-minute `make run`; stage 1 starts from the reference-token warm start)")
    eval: dict[str, Any] = Field(
        default_factory=lambda: {"max_test_clips": 4, "clip_seconds": 1.0, "steps": 4, "long_term_seconds": 30.0,
                                 "long_term_clips": 1, "long_term_every": 25, "fvd_clip_frames": 8},
        description="`eval` keys a member (ablation or sweep) evaluates with instead of the main line's, every member "
        "alike: 4 test clips of 1 s (FVD over 8-frame clips, 3 per clip) and 30 s of the first long-term test clip, "
        "per eval.long_term_window_seconds window (identity on every 25th frame), generated with 4 DDIM steps (the main "
        "line: 10; measured 0.028 vs 0.055 s per frame): what 21 members fit in the 40-minute `make run` on 2 cores. "
        "Members compare with each other, not with the main line. Narrower intervals: long_term_clips 2, "
        "max_test_clips 8 (claims.md says how many units each observed effect needs)")

    @field_validator("eval")
    @classmethod
    def _eval_overlay(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            EvalParams.model_validate(value)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
            raise ValueError(f"{key}: {msg}") from None
        return value


class SweepParams(Section):
    alphas: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9],
                                description="Eq. 5 alphas of the sweep (Figure 7); each member retrains stage 3 only and "
                                "is measured like an ablation member, long-term clip included (the paper's five: "
                                "[0.1, 0.3, 0.5, 0.7, 0.9], about 2 more minutes of `make run`)")
