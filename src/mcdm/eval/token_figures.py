"""token_figures: what the motion tokens look like. Beyond the paper, a lip-token heatmap; the paper's
Figure 6, a t-SNE of expression tokens (decisions.md #23).

1. Lip-token heatmap. On the first ``eval.token_figures.heatmap_clips`` test clips (regular clips first, the
   order ``evaluate`` picks them in), over the first ``eval.token_figures.heatmap_seconds``:
   * sampled: the present-clip motion prior's lip tokens, sampled clip after clip of
     ``model.clip_frames`` frames (``model.prior_inference_steps`` DDIM steps, generator seeded with
     ``seed``) from the clip's audio features and reference identity embedding, as
     ``MCDMPipeline.iter_clips`` calls ``PresentClipMotionPrior.sample`` without a driving video (the
     last clip filled by repeating its last audio frame, the extra frames dropped);
   * ground truth: the lip encoder's tokens of the clip's own mouth crops (``LipEncoder.encode_clip``,
     the tokens stage 2 learned to denoise).

   Both are in standardised token units (training statistics); each heatmap has its own symmetric
   colour scale (its 99th percentile of |value|), so a prior that samples far outside the encoder's
   range stays readable beside it and its colour bar shows by how much. Above each, the loudness
   envelope of the clip's audio: for video frame f holding the samples x_t of [f / fps, (f + 1) / fps),
   ``L_f = 20 log10(sqrt(mean x_t^2) + 1e-5)`` dBFS (digital silence: -100).

2. t-SNE of expression tokens. For every test and open-set clip of ``data/features``,
   ``eval.token_figures.tsne_frames_per_clip`` evenly spaced frames' expression tokens
   (``ExpressionEncoder.encode_clip`` of the clip's pose-normalised landmark offsets, whose neutral
   face is the clip's median: expression, not face shape), embedded in 2-D by scikit-learn's ``TSNE``
   (``random_state = seed``, PCA initialisation, perplexity ``min(tsne_perplexity, n_points - 1)``);
   colour = identity (``source_id``), marker = split.

Everything is read from the stored features (``audio``, ``ref_embedding``, ``mouth_crops``,
``waveform``, ``landmarks``): no video is decoded, no frame generated.
Outputs: the heatmap PNG, the t-SNE PNG and its CSV (``clip_id, split, identity, frame, x, y``), and a
summary JSON (clips, sizes, the perplexity used) that the report reads.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from mcdm.config import Params
from mcdm.errors import McdmError, MissingStageOutput
from mcdm.eval.test_set import read_index, select_test_clips
from mcdm.face.geometry import expression_offsets
from mcdm.media.files import jsonable, save_figure, write_csv, write_json
from mcdm.models.loading import load_strict
from mcdm.models.motion_encoders import MotionEncoders
from mcdm.models.motion_prior import PresentClipMotionPrior

STAGE = "token_figures"
TSNE_SPLITS = ("test", "open_set")
SPLIT_MARKERS = {"test": "o", "open_set": "^"}
LOUDNESS_FLOOR = 1e-5  # added to the RMS before the log: digital silence reads -100 dBFS, not -inf


# ---------------------------------------------------------------------------------------------- reading
def read_arrays(path: str | Path, keys: tuple[str, ...], stop: Optional[int] = None) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of one feature file, each sliced to ``[:stop]`` along its first axis."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingStageOutput(path, "features")
    with safe_open(str(path), framework="pt") as f:
        missing = sorted(set(keys) - set(f.keys()))
        if missing:
            raise McdmError(f"{path}: lacks {', '.join(missing)}")
        return {k: f.get_slice(k)[:stop].numpy() if stop is not None else f.get_tensor(k).numpy() for k in keys}


def load_motion_prior(folder: str | Path, variant: str):
    """The stage-2 present-clip motion prior, or None for ``wo_fpc`` (which has none)."""

    if Path(folder).is_dir():
        return load_strict(PresentClipMotionPrior, folder).requires_grad_(False)
    if variant == "wo_fpc":
        return None
    raise MissingStageOutput(folder, "train_stage2")


# ---------------------------------------------------------------------------------------------- the maths
def loudness_envelope(waveform: np.ndarray, n_frames: int, fps: float, rate: int) -> np.ndarray:
    """(n_frames,) dBFS: 20 log10 of the RMS of each video frame's audio samples (0 past the end)."""
    wave = np.asarray(waveform, np.float64).reshape(-1)
    edges = np.round(np.arange(n_frames + 1) / fps * rate).astype(int)
    rms = np.array([np.sqrt(np.mean(wave[a:b] ** 2)) if b > a and a < len(wave) else 0.0
                    for a, b in zip(edges[:-1], edges[1:])])
    return 20.0 * np.log10(rms + LOUDNESS_FLOOR)


def sample_lip_tokens(prior, audio: np.ndarray, ref_embedding: np.ndarray, clip_frames: int, steps: int,
                      generator: torch.Generator) -> np.ndarray:
    """(T, lip_dim) lip tokens the prior samples for audio features (T, A) and a reference embedding (E,),
    clip after clip of ``clip_frames`` frames as the pipeline samples them."""
    feats = torch.as_tensor(np.asarray(audio, np.float32))
    n = len(feats)
    pad = math.ceil(n / clip_frames) * clip_frames - n
    feats = torch.cat([feats, feats[-1:].expand(pad, -1)])[None]  # (1, T', A), last frame repeated
    ref = torch.as_tensor(np.asarray(ref_embedding, np.float32))[None]
    lips = [prior.sample(feats[:, s:s + clip_frames], ref, num_inference_steps=steps, generator=generator).lip[0]
            for s in range(0, n, clip_frames)]
    return torch.cat(lips)[:n].float().cpu().numpy()


def ground_truth_lip_tokens(lip_encoder, mouth_crops: np.ndarray) -> np.ndarray:
    """(T, lip_dim) lip tokens of (T, 32, 48) uint8 mouth crops."""
    return lip_encoder.encode_clip(torch.as_tensor(np.asarray(mouth_crops, np.uint8))).float().cpu().numpy()


def expression_tokens(expression_encoder, landmarks: np.ndarray) -> np.ndarray:
    """(T, expression_dim) expression tokens of a clip's (T, 68, 2) landmarks (neutral: the clip's median)."""

    offsets = torch.as_tensor(expression_offsets(np.asarray(landmarks, np.float32)))
    return expression_encoder.encode_clip(offsets).float().cpu().numpy()


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """At most k distinct frame indices spread over 0 .. n-1."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


def tsne_2d(points: np.ndarray, perplexity: float, seed: int) -> tuple[np.ndarray, float]:
    """(N, 2) t-SNE embedding of (N, d) points and the perplexity used, ``min(perplexity, N - 1)``."""
    from sklearn.manifold import TSNE

    points = np.asarray(points, np.float64)
    if points.ndim != 2 or len(points) < 2:
        raise McdmError(f"t-SNE: needs at least 2 points of shape (N, d); got {points.shape}")
    used = float(min(perplexity, len(points) - 1))
    tsne = TSNE(n_components=2, perplexity=used, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(points), used


# ---------------------------------------------------------------------------------------------- pictures
@dataclass
class LipPanel:
    """One clip of the heatmap: loudness (T,), sampled (T, d) or None (no prior), ground truth (T, d)."""

    clip_id: str
    identity: str
    loudness: np.ndarray
    sampled: Optional[np.ndarray]
    ground_truth: np.ndarray
    no_sample_reason: str = ""


def plot_lip_heatmap(panels: list[LipPanel], fps: float, path: str | Path) -> Path:
    """Per clip two columns, sampled | ground truth: the loudness envelope above a heatmap of the lip
    tokens (x: time in seconds, y: token dimension), each heatmap with its own symmetric colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not panels:
        raise McdmError("lip-token heatmap: no clip to draw")
    fig, axes = plt.subplots(2 * len(panels), 2, figsize=(12, 3.8 * len(panels)), squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": [1, 2.4] * len(panels)})
    for r, p in enumerate(panels):
        seconds = len(p.loudness) / fps
        t = (np.arange(len(p.loudness)) + 0.5) / fps
        for c, (name, tok) in enumerate((("sampled by the present-clip motion prior", p.sampled),
                                         ("ground truth (lip encoder on the mouth crops)", p.ground_truth))):
            top, heat = axes[2 * r, c], axes[2 * r + 1, c]
            top.plot(t, p.loudness, color="black", linewidth=0.8)
            top.set(xlim=(0, seconds), ylabel="dBFS", title=f"{p.clip_id} ({p.identity}): {name}")
            top.title.set_fontsize(8)
            top.tick_params(labelbottom=False)
            top.grid(alpha=0.3)
            heat.set(xlim=(0, seconds), xlabel="time (s)", ylabel="lip token dim")
            heat.yaxis.set_major_locator(MaxNLocator(integer=True))
            if tok is None:
                heat.text(0.5, 0.5, p.no_sample_reason or "not sampled", ha="center", va="center",
                          transform=heat.transAxes, fontsize=8)
                continue
            vmax = float(np.nanpercentile(np.abs(tok), 99)) or 1.0
            image = heat.imshow(tok.T, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest",
                                extent=(0, len(tok) / fps, tok.shape[1] - 0.5, -0.5))
            fig.colorbar(image, ax=[top, heat], shrink=0.8, label="token (standardised)")
    fig.suptitle("lip tokens over time, with the audio's loudness envelope above", fontsize=9)
    save_figure(fig, Path(path, dpi=110))
    return Path(path)


def plot_tsne(table: pd.DataFrame, perplexity: float, path: str | Path) -> Path:
    """Scatter of the t-SNE coordinates: colour = identity, marker = split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    identities = sorted(table["identity"].astype(str).unique())
    colours = plt.get_cmap("tab20" if len(identities) > 10 else "tab10")
    colour = {name: colours(i % colours.N) for i, name in enumerate(identities)}
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for (identity, split), rows in table.groupby([table["identity"].astype(str), "split"]):
        ax.scatter(rows["x"], rows["y"], s=14, color=colour[identity], marker=SPLIT_MARKERS.get(split, "s"),
                   alpha=0.8, linewidths=0)
    handles = [Line2D([], [], marker="o", linestyle="", color=colour[name], label=name) for name in identities]
    handles += [Line2D([], [], marker=SPLIT_MARKERS.get(s, "s"), linestyle="", color="grey", label=f"split: {s}")
                for s in sorted(table["split"].unique())]
    ax.legend(handles=handles, fontsize=7, loc="best", title="identity / split", title_fontsize=7)
    ax.set(xlabel="t-SNE 1", ylabel="t-SNE 2",
           title=f"t-SNE of expression tokens: {len(table)} frames of {table['clip_id'].nunique()} clips "
                 f"(perplexity {perplexity:g})")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    save_figure(fig, Path(path, dpi=110))
    return Path(path)


# ---------------------------------------------------------------------------------------------- the stage
def lip_panels(clips: pd.DataFrame, prior, lip_encoder, params: Params) -> list[LipPanel]:
    """The heatmap's clips: loudness, sampled and ground-truth lip tokens over the first seconds."""
    fps, rate = params.data.fps, params.data.audio_rate
    limit = max(1, int(round(params.eval.token_figures.heatmap_seconds * fps)))
    generator = torch.Generator().manual_seed(params.seed)
    panels = []
    for row in clips.to_dict("records"):
        n = min(int(row["n_frames"]), limit)
        a = read_arrays(row["file"], ("audio", "mouth_crops"), stop=n)
        a.update(read_arrays(row["file"], ("ref_embedding",)))
        wave = read_arrays(row["file"], ("waveform",), stop=int(round(n / fps * rate)))["waveform"]
        sampled, reason = None, "variant wo_fpc: no present-clip motion prior to sample"
        if prior is not None:
            sampled = sample_lip_tokens(prior, a["audio"], a["ref_embedding"], params.model.clip_frames,
                                        params.model.prior_inference_steps, generator)
        panels.append(LipPanel(str(row["clip_id"]), str(row.get("source_id")), loudness_envelope(wave, n, fps, rate),
                               sampled, ground_truth_lip_tokens(lip_encoder, a["mouth_crops"]),
                               "" if sampled is not None else reason))
    return panels


def expression_table(index: pd.DataFrame, expression_encoder, frames_per_clip: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows ``clip_id, split, identity, frame`` and their (N, d) expression tokens: every test and
    open-set clip, ``frames_per_clip`` evenly spaced frames each."""
    chosen = index[index["split"].isin(TSNE_SPLITS)].sort_values(["split", "clip_id"], key=lambda s: s.astype(str))
    if chosen.empty:
        raise McdmError("t-SNE: data/features holds no test or open-set clip")
    rows, tokens = [], []
    for clip in chosen.to_dict("records"):
        landmarks = read_arrays(clip["file"], ("landmarks",))["landmarks"]
        picks = evenly_spaced(len(landmarks), frames_per_clip)
        tokens.append(expression_tokens(expression_encoder, landmarks)[picks])
        rows += [{"clip_id": clip["clip_id"], "split": clip["split"], "identity": clip.get("source_id"), "frame": int(f)}
                 for f in picks]
    return pd.DataFrame(rows), np.concatenate(tokens)


def token_figures(features_dir: str | Path, motion_prior_dir: str | Path, motion_encoders_dir: str | Path,
                  heatmap_path: str | Path, tsne_path: str | Path, tsne_csv: str | Path, summary_path: str | Path,
                  params: Params) -> dict:
    """Run the stage (see the module docstring); returns the content of the summary JSON."""

    started = time.perf_counter()
    tf = params.eval.token_figures
    index = read_index(features_dir)
    encoders = MotionEncoders.load(motion_encoders_dir)
    prior = load_motion_prior(motion_prior_dir, params.variant)
    # 1. lip tokens over time
    panels = lip_panels(select_test_clips(index, tf.heatmap_clips), prior, encoders.lip, params)
    plot_lip_heatmap(panels, params.data.fps, heatmap_path)
    # 2. t-SNE of expression tokens
    table, tokens = expression_table(index, encoders.expression, tf.tsne_frames_per_clip)
    coords, perplexity = tsne_2d(tokens, tf.tsne_perplexity, params.seed)
    table["x"], table["y"] = coords[:, 0], coords[:, 1]
    write_csv(table, Path(tsne_csv))
    plot_tsne(table, perplexity, tsne_path)
    summary = {
        "lip_heatmap": {"path": str(heatmap_path), "clips": [p.clip_id for p in panels],
                        "frames": [len(p.loudness) for p in panels], "sampled": prior is not None,
                        "lip_dim": int(panels[0].ground_truth.shape[1]), "prior_steps": params.model.prior_inference_steps,
                        "clip_frames": params.model.clip_frames, "not_sampled_reason": panels[0].no_sample_reason or None},
        "tsne": {"path": str(tsne_path), "csv": str(tsne_csv), "points": len(table), "clips": int(table["clip_id"].nunique()),
                 "identities": int(table["identity"].nunique()),
                 "splits": {s: int((table["split"] == s).sum()) for s in TSNE_SPLITS},
                 "expression_dim": int(tokens.shape[1]), "perplexity": perplexity, "random_state": params.seed},
        "params_hash": params.hash(), "seconds": time.perf_counter() - started,
    }
    write_json(jsonable(summary), Path(summary_path))
    return jsonable(summary)
