"""Issue #20's targets for what a person sees, checked on one evaluation's numbers: each target's
measured value, its threshold and whether it is met (None when a number is missing).

| target                      | value                                                       | met when        |
|-----------------------------|-------------------------------------------------------------|-----------------|
| ``resolution``              | side of the generated frames, px                            | >= 128          |
| ``autoencoder_identity_gap``| autoencoder ceiling's identity - ground truth's              | <= 0.10         |
| ``identity_gap``            | generated identity (lost faces charged) - ground truth's     | <= 0.15         |
| ``no_face_frames``          | generated frames without a face (identity's frames)          | == 0            |
| ``sync_c_fraction``         | Sync-C / ground truth's Sync-C (same SyncNet)                | >= 0.5          |
| ``mouth_open_corr``         | mouth-opening correlation with ground truth (lip_motion)     | >= 0.5          |
| ``sharpness_ratio``         | Laplacian variance, generated / ground truth (sharpness)     | 0.5 to 1.5      |

Point values: ``mouth_open_corr`` carries its bootstrap interval over clips beside it; the claims
stage answers the paper's comparisons with intervals.
"""
from __future__ import annotations

import math
from typing import Optional

TARGETS = {
    "resolution": (">=", 128),
    "autoencoder_identity_gap": ("<=", 0.10),
    "identity_gap": ("<=", 0.15),
    "no_face_frames": ("==", 0),
    "sync_c_fraction": (">=", 0.5),
    "mouth_open_corr": (">=", 0.5),
    "sharpness_ratio": ("within", (0.5, 1.5)),
}


def _number(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _met(op: str, value: Optional[float], threshold) -> Optional[bool]:
    if value is None:
        return None
    if op == ">=":
        return value >= threshold
    if op == "<=":
        return value <= threshold
    if op == "==":
        return value == threshold
    low, high = threshold
    return low <= value <= high


def _difference(a, b) -> Optional[float]:
    a, b = _number(a), _number(b)
    return None if a is None or b is None else a - b


def quality_targets(model: dict, baselines: Optional[dict], resolution: int) -> dict:
    """{target: {"value", "target", "met"}} of the module docstring's table, from the model's flat
    metrics and the baselines (``autoencoder``, ``ground_truth``) of the same run."""
    base = baselines or {}
    auto, truth = base.get("autoencoder") or {}, base.get("ground_truth") or {}
    sync, sync_gt = _number(model.get("sync_c")), _number(truth.get("sync_c"))
    values = {
        "resolution": float(resolution),
        "autoencoder_identity_gap": _difference(auto.get("identity"), model.get("identity_gt")),
        "identity_gap": _difference(model.get("identity"), model.get("identity_gt")),
        "no_face_frames": _number(model.get("identity_no_face_frames")),
        "sync_c_fraction": None if sync is None or not sync_gt else sync / sync_gt,
        "mouth_open_corr": _number(model.get("mouth_open_corr")),
        "sharpness_ratio": _number(model.get("sharpness_ratio")),
    }
    out = {}
    for name, (op, threshold) in TARGETS.items():
        shown = f"{threshold[0]} to {threshold[1]}" if op == "within" else f"{op} {threshold}"
        out[name] = {"value": values[name], "target": shown, "met": _met(op, values[name], threshold)}
    out["mouth_open_corr"].update(low=_number(model.get("mouth_open_corr_low")),
                                  high=_number(model.get("mouth_open_corr_high")))
    return out
