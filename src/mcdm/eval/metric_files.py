"""The files an evaluation writes: a small headline (the DVC metric and MLflow's run metrics) and
everything else beside it.

* ``metrics.json`` (headline): the paper's six metrics, identity, the face failure rate, the
  mouth-opening correlation with ground truth, the sharpness ratio, PSNR and the seconds per
  generated frame, plus ``fallback``: which of the six were measured by a labelled
  fallback rather than the paper's network (``"fid fvd efid sync_c sync_d"`` here; empty with every
  network given by path). These are what ``dvc metrics show`` / ``dvc exp show`` list.
* ``metrics_details.json``: the headline's values again and every other number (backend labels,
  counts, failure intervals, FVD parts, baselines, checks, the long-term summary, the member block);
  what the report and the claims stage read.
* ``features.npz``: the feature rows behind each Fréchet distance, per arm (the model, and on the
  main line its baselines), with the clip of every row: ``<arm>__<metric>__<real|fake|real_video|fake_video>``;
  the claims stage bootstraps the set-level metrics from them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from mcdm.media.files import jsonable, write_json

HEADLINE = ("fid", "fvd", "sync_c", "sync_d", "ssim", "efid", "identity", "failure_rate", "mouth_open_corr",
            "sharpness_ratio", "psnr", "seconds_per_frame")
PAPER_METRICS = ("fid", "fvd", "sync_c", "sync_d", "ssim", "efid")
# backend labels of the fallbacks (mcdm.eval.detectors, landmark_features, face_features, models.sync)
FALLBACK_BACKENDS = ("dlib-descriptor-128", "fvd-fallback:dlib-descriptor+landmark-dynamics",
                     "landmark-expression-offsets", "syncnet_trained")
METRICS_JSON, DETAILS_JSON, FEATURES_NPZ = "metrics.json", "metrics_details.json", "features.npz"


def fallback_metrics(metrics: dict) -> str:
    """The paper metrics whose backend is a fallback, space-separated, in ``PAPER_METRICS`` order."""
    return " ".join(m for m in PAPER_METRICS if metrics.get(f"{m}_backend") in FALLBACK_BACKENDS)


def headline(metrics: dict) -> dict:
    """The headline of a full metrics dict: ``HEADLINE`` values (None when not computed) and ``fallback``."""
    return {**{key: metrics.get(key) for key in HEADLINE}, "fallback": fallback_metrics(metrics)}


def write_metric_files(metrics: dict, out_dir: str | Path, rows: Optional[dict[str, dict[str, dict]]] = None) -> dict:
    """Write ``metrics.json`` (headline), ``metrics_details.json`` (all of ``metrics``) and, with
    ``rows`` ({arm: {metric: {real, fake, real_video, fake_video}}}), ``features.npz``; returns the headline."""
    out_dir = Path(out_dir)
    top = jsonable(headline(metrics))
    write_json(jsonable(metrics), out_dir / DETAILS_JSON)
    write_json(top, out_dir / METRICS_JSON)
    if rows is not None:
        arrays = {f"{arm}__{metric}__{key}": np.asarray(value)
                  for arm, by_metric in rows.items() for metric, table in by_metric.items() for key, value in table.items()}
        tmp = out_dir / f".{FEATURES_NPZ}.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        tmp.replace(out_dir / FEATURES_NPZ)
    return top


def read_details(path: str | Path) -> Optional[dict]:
    """An evaluation's full metrics: ``metrics_details.json`` (given, or beside a given ``metrics.json``),
    None when missing or not JSON."""
    path = Path(path)
    if path.name == METRICS_JSON:
        path = path.with_name(DETAILS_JSON)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def read_features(path: str | Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``features.npz`` as {arm: {metric: {real, fake, real_video, fake_video}}} ({} when missing)."""
    path = Path(path)
    if not path.is_file():
        return {}
    out: dict = {}
    with np.load(path) as npz:
        for key in npz.files:
            arm, metric, part = key.split("__")
            out.setdefault(arm, {}).setdefault(metric, {})[part] = npz[key]
    return out
