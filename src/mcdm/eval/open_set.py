"""open_set: unseen portraits speaking held-out audio in several languages (the paper's open-set test,
decisions.md #23).

Pairs. ``data/split/open_set.parquet`` holds every clip of the identities the split kept out of
training AND test (``data.split.open_set_identities``), each paired with one held-out audio clip of the
test split, of another language where there is one (``audio_language``, ``cross_language``; see
``mcdm.data.split``). The first ``eval.open_set.max_pairs`` pairs by portrait clip id are used.

Inputs come from ``data/features``, which featurises the open-set clips too, so no video is decoded:
the portrait is frame 0 of the portrait clip's crop with its landmarks (the reference ``evaluate``
uses), the audio is the audio clip's 16 kHz waveform. A clip that the features stage rejected is read
from the split table's paths instead (the crop's first frame and the landmark file; the audio track)
and labelled ``crop`` / ``audio_path`` in the table.

Generation: ``n = min(eval.clip_seconds * data.fps, audio length)`` frames per pair with the main-line
pipeline (``mcdm.pipelines.loading.load_from_models_dir``, ``eval.steps`` DDIM steps, generator seeded with ``seed``),
``eval.batch_size`` pairs per batch, never driven by landmarks (the portrait clip's landmarks belong to
other speech).

Metrics, with ``evaluate``'s backends (``MetricSuite``); one that cannot be computed is null with its
reason (``*_error``), like evaluate's ``guard``:
* Sync-C / Sync-D of each generated video against its paired audio (SyncNet, decisions.md #22);
* ``identity``: mean over every ``eval.frame_stride``-th generated frame of the dlib-descriptor
  distance ``||d(frame) - d(portrait)||`` (decisions.md #20), a generated frame without a face charged
  ``IDENTITY_FAILURE_DISTANCE`` (``mcdm.eval.failures``; the group's ``identity_failure_rate`` beside it),
  beside ``identity_gt``: the same distance for the portrait clip's own first n frames (the speaker's
  natural variation; other speech; frames without a face left out);
* FID per audio language and overall (a set statistic, not a row's): Fréchet distance
  ``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))`` between the features (dlib descriptor
  fallback, or Inception with ``eval.inception_path``) of the generated frames (every
  ``frame_stride``-th) and of ``eval.open_set.fid_real_frames`` TRAINING frames, evenly spaced over the
  train clips: how far videos of unseen faces are from the training distribution.

Aggregation (``summarise``): per audio language and over all pairs, each row metric's mean over the
pairs that have it (``<metric>_n`` of them) and the distinct reasons of those that lack it.

Outputs: the table (``open_set.csv``, a row per portrait x audio) and the summary (``open_set.json``:
``by_language``, ``overall``, the backend labels, the params hash).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from mcdm.config import Params
from mcdm.data.features import load_landmarks
from mcdm.errors import McdmError, MissingStageOutput
from mcdm.eval import metrics as M
from mcdm.eval.failures import penalised_identity
from mcdm.eval.statistics import failure_rate
from mcdm.eval.suite import MetricSuite
from mcdm.eval.test_set import ClipFeatures, generate_batched, read_index
from mcdm.eval.video_metrics import guard_flat
from mcdm.media.files import jsonable, write_csv, write_json
from mcdm.media.io import MediaError, read_audio, read_frames
from mcdm.pipelines.loading import load_from_models_dir

STAGE = "open_set"
PAIR_COLUMNS = ("clip_id", "source_id", "audio_clip_id", "audio_language", "cross_language")
# row metric -> the column holding the reason it is missing
ROW_METRICS = {"sync_c": "sync_error", "sync_d": "sync_error", "identity": "identity_error",
               "identity_gt": "identity_gt_error"}
TABLE_COLUMNS = ["portrait_clip_id", "portrait_identity", "portrait_language", "audio_clip_id", "audio_language",
                 "cross_language", "n_frames", "sync_c", "sync_d", "av_offset", "identity", "identity_gt",
                 "identity_no_face_frames", "identity_frames", "sync_backend", "identity_backend", "portrait_source", "audio_source",
                 "sync_error", "identity_error", "identity_gt_error"]
ALL = "all"  # the group of every pair in the summary


# ---------------------------------------------------------------------------------------------- inputs
def read_pairs(path: str | Path) -> pd.DataFrame:
    """The split's open-set table, sorted by portrait clip id."""
    path = Path(path)
    if not path.is_file():
        raise MissingStageOutput(path, "split")
    pairs = pd.read_parquet(path)
    missing = [c for c in PAIR_COLUMNS if c not in pairs]
    if missing:
        raise McdmError(f"{path}: lacks columns {', '.join(missing)}")
    return pairs.sort_values("clip_id").reset_index(drop=True)


@dataclass
class PairInputs:
    """What one pair generates from and is measured against."""

    portrait: np.ndarray  # (S, S, 3) uint8: frame 0 of the portrait clip's crop
    portrait_landmarks: np.ndarray  # (68, 2) crop pixels
    audio: np.ndarray  # (n / fps * rate,) 16 kHz mono
    n: int  # frames to generate
    portrait_frames: Optional[np.ndarray]  # (n', S, S, 3) the portrait clip's own first frames; None: not featurised
    portrait_source: str  # "features" | "crop"
    audio_source: str  # "features" | "audio_path"


def _frame_limit(params: Params) -> Optional[int]:
    seconds = params.eval.clip_seconds
    return None if seconds is None else max(1, int(round(seconds * params.data.fps)))


def pair_inputs(pair: dict, files: dict[str, str], params: Params) -> PairInputs:
    """Portrait and audio of one pair, from its clips' feature files (else from the split's paths)."""

    fps, rate, limit = params.data.fps, params.data.audio_rate, _frame_limit(params)
    audio_id, portrait_id = str(pair["audio_clip_id"]), str(pair["clip_id"])
    try:
        if audio_id in files:
            clip = ClipFeatures(files[audio_id])
            n = clip.n_frames if limit is None else min(clip.n_frames, limit)
            audio, audio_source = clip.waveform(n, fps, rate), "features"
        else:
            wave = read_audio(pair["audio_path"], rate)
            total = max(1, int(len(wave) / rate * fps))
            n = total if limit is None else min(total, limit)
            length = int(round(n / fps * rate))
            audio, audio_source = np.pad(wave[:length], (0, max(0, length - len(wave)))), "audio_path"
        if portrait_id in files:
            clip = ClipFeatures(files[portrait_id])
            frames, landmarks = clip.frames(0, n), clip.landmarks(0, 1)[0]
            return PairInputs(frames[0], landmarks, audio, n, frames, "features", audio_source)
        portrait = read_frames(pair["crop_path"], fps=fps, max_frames=1)[0]
        landmarks = load_landmarks(pair["landmarks_path"])[0][0]
    except (MediaError, OSError, KeyError) as err:
        raise McdmError(f"pair {portrait_id} x {audio_id}: cannot read its inputs ({str(err).splitlines()[0][:160]})") from None
    return PairInputs(portrait, landmarks, audio, n, None, "crop", audio_source)


def training_frames(index: pd.DataFrame, n: int) -> tuple[np.ndarray, list[str]]:
    """(at most n, S, S, 3) training frames, evenly spaced within each train clip of the features index
    (n shared as evenly as possible among the clips), and the clips they come from."""
    train = index[index["split"] == "train"].sort_values("clip_id")
    if train.empty:
        raise McdmError("fid: data/features holds no train clip for the real set")
    counts = [len(part) for part in np.array_split(np.arange(n), len(train))]
    frames, used = [], []
    for row, k in zip(train.to_dict("records"), counts):
        if not k:
            continue
        clip = ClipFeatures(row["file"])
        picks = np.unique(np.linspace(0, clip.n_frames - 1, min(k, clip.n_frames)).round().astype(int))
        frames += [clip.frames(i, i + 1)[0] for i in picks]
        used.append(str(row["clip_id"]))
    return np.stack(frames), used


# ---------------------------------------------------------------------------------------------- generation
def generate_pairs(pipe, inputs: list[PairInputs], params: Params, progress: bool = True) -> list[np.ndarray]:
    """A generated video (n_i, S, S, 3) per pair, in input order; pairs of similar length share a batch."""
    videos, _ = generate_batched(pipe, [x.portrait for x in inputs], [x.portrait_landmarks for x in inputs],
                                 [x.audio for x in inputs], [x.n for x in inputs], params,
                                 desc="generating open-set pairs", progress=progress)
    return videos


# ---------------------------------------------------------------------------------------------- metrics
def _mean_identity(portrait: np.ndarray, frames: np.ndarray, faces, what: str,
                   charge: bool) -> tuple[Optional[float], Optional[int], Optional[str]]:
    """(mean dlib distance of ``frames`` to ``portrait``, frames without a face, reason when there is no
    mean). ``charge``: frames without a face count as ``IDENTITY_FAILURE_DISTANCE`` (generated frames);
    otherwise they are left out (the portrait clip's own). No face in the portrait: nothing measured."""
    try:
        curve = M.identity_curve(portrait, frames, faces)
    except McdmError as err:
        return None, None, str(err)
    ok = np.isfinite(curve)
    if charge:
        return float(penalised_identity(curve).mean()), int((~ok).sum()), None
    if not ok.any():
        return None, len(frames), f"{what}: no face found in any of the {len(frames)} frames"
    return float(curve[ok].mean()), int((~ok).sum()), None


def pair_metrics(suite: MetricSuite, video: np.ndarray, x: PairInputs) -> dict:
    """Sync-C / Sync-D against the paired audio, identity to the portrait (and the portrait clip's own)."""
    stride = suite.params.frame_stride
    sync = guard_flat("sync_c", "syncnet", lambda: suite.sync([video], [x.audio]))
    identity, no_face, identity_error = _mean_identity(x.portrait, video[::stride], suite.faces, "identity", True)
    if x.portrait_frames is None:
        identity_gt, gt_error = None, "identity_gt: the portrait clip is not in data/features (its frames are not decoded)"
    else:
        identity_gt, _, gt_error = _mean_identity(x.portrait, x.portrait_frames[::stride], suite.faces, "identity_gt",
                                                  False)
    return {"n_frames": len(video), "sync_c": sync.get("sync_c"), "sync_d": sync.get("sync_d"),
            "av_offset": sync.get("av_offset_abs"), "identity": identity, "identity_gt": identity_gt,
            "identity_no_face_frames": no_face, "identity_frames": len(video[::stride]),
            "sync_backend": sync.get("sync_c_backend"),
            "identity_backend": M.IDENTITY_BACKEND, "sync_error": sync.get("sync_c_error"),
            "identity_error": identity_error, "identity_gt_error": gt_error}


def group_fid(suite: MetricSuite, real: Optional[np.ndarray], videos: list[np.ndarray], real_error: Optional[str]) -> dict:
    """FID of the generated frames of ``videos`` (every ``frame_stride``-th) against the training frames."""
    backend = suite.backends["fid"]
    if real is None or not videos:
        reason = real_error or "fid: no generated video in this group"
        return {"fid": None, "fid_backend": backend, "fid_error": reason}
    fake = np.concatenate([v[::suite.params.frame_stride] for v in videos])
    return guard_flat("fid", backend, lambda: M.fid(real, fake, suite.fid_backend))


def _group_key(language) -> str:
    return "unknown" if language is None or (isinstance(language, float) and math.isnan(language)) else str(language)


def summarise(table: pd.DataFrame, fids: Optional[dict[str, dict]] = None) -> dict[str, dict]:
    """Per audio language and over all pairs (``"all"``): ``n_pairs``, ``cross_language_pairs``, each
    row metric's mean over the pairs that have it with ``<metric>_n`` and, when some lack it, their
    distinct reasons (``<metric>_error``), each metric's backend label; plus the group's FID dict."""
    fids = fids or {}
    groups = {_group_key(lang): rows for lang, rows in table.groupby(table["audio_language"].map(_group_key), sort=True)}
    groups[ALL] = table
    out = {}
    for name, rows in groups.items():
        g: dict = {"n_pairs": int(len(rows)), "cross_language_pairs": int(rows["cross_language"].astype(bool).sum())}
        for metric, error_col in ROW_METRICS.items():
            values = pd.to_numeric(rows[metric], errors="coerce").to_numpy(np.float64)
            ok = np.isfinite(values)
            g[metric] = float(values[ok].mean()) if ok.any() else None
            g[f"{metric}_n"] = int(ok.sum())
            column = "sync_backend" if metric.startswith("sync") else "identity_backend"
            backends = sorted({b for b in rows.loc[ok if ok.any() else slice(None), column] if isinstance(b, str)})
            g[f"{metric}_backend"] = " / ".join(backends) if backends else None
            reasons = sorted({str(r) for r in rows.loc[~ok, error_col] if isinstance(r, str) and r})
            if (~ok).any():
                g[f"{metric}_error"] = "; ".join(reasons) or "not computed"
        counts = [pd.to_numeric(rows.get(c, pd.Series(dtype=float)), errors="coerce").fillna(0).to_numpy(int)
                  for c in ("identity_no_face_frames", "identity_frames")]
        lost, frames = counts
        if frames.sum():
            rate = failure_rate(np.repeat([True, False], [lost.sum(), frames.sum() - lost.sum()]))
            g.update(identity_failure_rate=rate.value, identity_failure_rate_low=rate.low,
                     identity_failure_rate_high=rate.high)
        g.update(fids.get(name, {}))
        out[name] = g
    return out


# ---------------------------------------------------------------------------------------------- the stage
def _table_row(pair: dict) -> dict:
    return {"portrait_clip_id": pair["clip_id"], "portrait_identity": pair["source_id"],
            "portrait_language": pair.get("language"), "audio_clip_id": pair["audio_clip_id"],
            "audio_language": pair["audio_language"], "cross_language": bool(pair["cross_language"])}


def open_set(pairs_path: str | Path, features_dir: str | Path, models_dir: str | Path, syncnet: str | Path,
             table_path: str | Path, summary_path: str | Path, params: Params, pipe=None, progress: bool = True) -> dict:
    """Run the stage (see the module docstring); returns the content of the summary JSON."""

    started = time.perf_counter()
    available = read_pairs(pairs_path)
    pairs = available.head(params.eval.open_set.max_pairs)
    index = read_index(features_dir)
    files = dict(zip(index["clip_id"].astype(str), index["file"]))
    if not Path(syncnet).exists():
        raise MissingStageOutput(syncnet, "syncnet_train")
    if pipe is None:
        pipe = load_from_models_dir(models_dir, params)
    pipe.check_variant(params.variant)
    suite = MetricSuite(params.eval, syncnet=syncnet, fps=params.data.fps, sync_max_offset=params.data.syncnet.max_offset)

    # 1. inputs: a pair whose clips cannot be read is a row of nulls with the reason
    rows, inputs = [], []
    for pair in pairs.to_dict("records"):
        row = _table_row(pair)
        try:
            x = pair_inputs(pair, files, params)
        except McdmError as err:
            rows.append({**row, "n_frames": 0, **{col: str(err) for col in set(ROW_METRICS.values())}})
            continue
        rows.append({**row, "portrait_source": x.portrait_source, "audio_source": x.audio_source})
        inputs.append((len(rows) - 1, x))
    # 2. generate, 3. measure each pair
    videos = generate_pairs(pipe, [x for _, x in inputs], params, progress)
    for (i, x), video in zip(inputs, videos):
        rows[i].update(pair_metrics(suite, video, x))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    # 4. FID per audio language and overall, against training frames
    real = real_error = None
    real_clips: list[str] = []
    try:
        real, real_clips = training_frames(index, params.eval.open_set.fid_real_frames)
    except McdmError as err:
        real_error = str(err)
    by_group: dict[str, list[np.ndarray]] = {ALL: list(videos)}
    for (i, _), video in zip(inputs, videos):
        by_group.setdefault(_group_key(rows[i]["audio_language"]), []).append(video)
    fids = {name: group_fid(suite, real, group, real_error) for name, group in by_group.items()}
    groups = summarise(table, fids)
    overall = groups.pop(ALL)
    sync_backend = overall.get("sync_c_backend") or "syncnet"
    # 5. write
    summary = {
        "overall": overall, "by_language": groups, "languages": sorted(groups),
        "backends": {"sync_c": sync_backend, "sync_d": sync_backend, "identity": M.IDENTITY_BACKEND,
                     "fid": suite.backends["fid"]},
        "fid_real": {"split": "train", "frames": 0 if real is None else len(real), "clips": real_clips,
                     "error": real_error},
        "table": str(table_path), "n_pairs": len(table), "pairs_available": len(available),
        "variant": pipe.variant, "alpha": float(pipe.denoiser.config.alpha), "steps": params.eval.steps,
        "clip_seconds": params.eval.clip_seconds, "params_hash": params.hash(),
        "model_params_hash": pipe.config.provenance.get("params_hash"), "checkpoint": pipe.config.provenance.get("source"),
        "seconds": time.perf_counter() - started,
    }
    write_csv(table, Path(table_path))
    write_json(jsonable(summary), Path(summary_path))
    return jsonable(summary)
