"""Hand-made evaluation folders (what `mcdm evaluate` / `mcdm ablate` write: eval_clips.csv,
metrics_details.json, metrics.json, features.npz, long_term_windows.csv) with known effects, for the
claims and report tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mcdm.config import Params
from mcdm.eval.metric_files import write_metric_files

CLIPS = ["c0", "c1", "c2", "c3"]
SEEDS = [0, 1, 2]
SHIFT = np.array([0.3, -0.4])  # a variant's FID features: full's shifted by this (d^2 = 0.25)


def _features(seed: int, shift=np.zeros(2)) -> dict:
    """Per clip 5 real rows; the generated rows equal them plus ``shift``: FD = |shift|^2 exactly."""
    rng = np.random.default_rng(100 + seed)
    real = rng.normal(size=(5 * len(CLIPS), 2))
    owners = np.repeat(np.arange(len(CLIPS)), 5)
    return {"real": real, "fake": real + shift, "real_video": owners, "fake_video": owners}


def evaluation(folder: Path, seed: int, ssim: np.ndarray, member: dict | None = None, shift=np.zeros(2),
                windows: list[tuple[float, float]] | None = None, baselines: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"clip_id": CLIPS, "n_frames": 25, "ssim": ssim, "sync_c": 0.1, "sync_d": 0.8,
                          "identity": 0.5, "identity_gt": 0.4, "face_frames": 13, "no_face_frames": 0})
    for arm, values in (baselines or {}).items():
        for key, v in values.items():
            table[f"{arm}_{key}"] = v
    table.to_csv(folder / "eval_clips.csv", index=False)
    details = {"ssim": float(np.mean(ssim)), "ssim_backend": "ssim-wang2004", "fid_backend": "dlib-descriptor-128",
               "clips": CLIPS, "seed": seed, "params_hash": f"h{seed}"}
    if member:
        details["member"] = {**member, "seed": seed}
    rows = {"model": {"fid": _features(seed, shift)}}
    for arm in baselines or {}:
        rows[arm] = {"fid": _features(seed, np.array([2.0, 0.0]))}
    write_metric_files(details, folder, rows)
    if windows:
        pd.DataFrame([{"clip_id": c, "window": w, "start_s": 5.0 * w, "end_s": 5.0 * (w + 1), "frames": 125,
                       "ssim": s0 - w * decay, "identity": 0.4 + w * decay, "identity_frames": 8, "no_face_frames": 0,
                       "identity_gt": None, "sync_c": 0.1, "sync_d": 0.8}
                      for c in CLIPS[:2] for w in range(3) for s0, decay in [windows[0]]]).to_csv(
            folder / "long_term_windows.csv", index=False)


def _member(variant: str, seed: int, alpha=None) -> dict:
    kind = "ablation" if alpha is None else "sweep"
    return {"name": f"{variant}-s{seed}" if alpha is None else f"alpha-{alpha}", "kind": kind, "variant": variant,
            "alpha": 0.1 if alpha is None else alpha, "retrained_stages": [1, 2, 3]}


def build(root: Path) -> tuple[Path, Params]:
    """reports/ with a main line and members: full beats wo_mta by exactly 0.05 SSIM on every unit;
    wo_fa beats full by 0.02; b1 ties full up to +-0.01; wo_fpc's FID features are full's shifted (FD
    0.25 worse); the sweep's SSIM = const - 0.1 alpha; no b2 member."""
    reports, members = root / "reports", root / "reports" / "ablations"
    base = np.array([0.30, 0.35, 0.40, 0.45])
    evaluation(reports, 0, base, baselines={"static_reference": {"sync_c": 0.05, "ssim": 0.7, "identity": 0.0}})
    for seed in SEEDS:
        own = base + 0.01 * seed
        evaluation(members / f"full-s{seed}", seed, own, _member("full", seed), windows=[(0.5, 0.01)])
        evaluation(members / f"wo_mta-s{seed}", seed, own - 0.05, _member("wo_mta", seed), windows=[(0.5, 0.03)])
        evaluation(members / f"wo_fa-s{seed}", seed, own + 0.02, _member("wo_fa", seed), windows=[(0.5, 0.05)])
        evaluation(members / f"wo_fpc-s{seed}", seed, own, _member("wo_fpc", seed), shift=SHIFT)
        evaluation(members / f"b1-s{seed}", seed, own + np.array([-0.012, 0.01, -0.01, 0.01]), _member("b1", seed))
    for alpha in (0.1, 0.5, 0.9):
        evaluation(members / f"alpha-{alpha}", 0, base + 0.3 - 0.1 * alpha, _member("full", 0, alpha),
                    windows=[(0.5, 0.02)])
    params = Params.model_validate({"ablations": {"seeds": SEEDS, "variants": ["full", "wo_fa", "wo_fpc", "wo_mta", "b1", "b2"]},
                                    "sweep": {"alphas": [0.1, 0.5, 0.9]},
                                    "eval": {"claims": {"n_boot": 500, "set_level_boot": 200}}})  # seconds, not a minute
    return reports, params
