"""The pictures of the claims, every number with its 95% interval: the effects behind the Table 4-5 and
Figure 5 claims (``claims_effects.png``), the alpha sweep (``alpha_sweep.png``, Figure 7) and the
long-term windows per variant (``long_term_variants.png``, Figure 5); and the per-arm summaries they
draw (a mean over units with its bootstrap interval, two-level by seed when there are several)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from mcdm.config import ClaimsParams
from mcdm.errors import McdmError
from mcdm.eval.ablation_tables import METRICS
from mcdm.eval.claim_inputs import ROW_METRICS, SET_METRICS, Arm, Evidence, sweep_name
from mcdm.eval.claims import LABELS
from mcdm.eval.failures import no_face_feature
from mcdm.eval.frechet import frechet_from_features
from mcdm.eval.statistics import bootstrap_ci
from mcdm.media.files import save_figure

VERDICT_COLOURS = {"supported": "tab:green", "refuted": "tab:red", "inconclusive": "tab:grey"}


def mean_ci(values: pd.Series, cfg: ClaimsParams) -> dict:
    """Mean of the finite values over units (index (clip_id, seed)) with its bootstrap interval."""
    v = pd.to_numeric(values, errors="coerce")
    v = v[np.isfinite(v)]
    out = {"value": float(v.mean()) if len(v) else None, "low": None, "high": None, "n": int(len(v))}
    if len(v) >= 2:
        seeds = list(v.index.get_level_values("seed"))
        est = bootstrap_ci(v.to_numpy(), n_boot=cfg.n_boot, level=cfg.level, seed=cfg.seed,
                           groups=seeds if len(set(seeds)) >= 2 else None)
        out.update(low=est.low, high=est.high)
    return out


def set_value(arm: Arm, metric: str) -> Optional[float]:
    """The Fréchet distance over all the arm's units (lost faces charged), no interval."""
    f = arm.features.get(metric)
    if not f or not f.get("fake"):
        return None
    units = [u for u in f["fake"] if u in f["real"]]
    real = np.concatenate([f["real"][u] for u in units])
    fake = np.concatenate([f["fake"][u] for u in units])
    try:
        zeta = no_face_feature(real)
        fake = np.where(np.isfinite(fake).all(axis=1, keepdims=True), fake, zeta)
        return frechet_from_features(real[np.isfinite(real).all(axis=1)], fake)
    except McdmError:
        return None


def arm_summary(arm: Arm, cfg: ClaimsParams) -> dict:
    """Per metric: unit metrics as ``mean_ci``; set metrics as their pooled value (``n`` units); the
    long-term per-clip values as ``mean_ci``."""
    out = {m: mean_ci(arm.units[m], cfg) for m in ROW_METRICS if m in arm.units}
    for m in SET_METRICS:
        out[m] = {"value": set_value(arm, m), "low": None, "high": None,
                  "n": len(arm.features.get(m, {}).get("fake", {}))}
    for m in ("ssim_decay", "ssim_last", "identity_drift"):
        if m in arm.long and len(arm.long):
            out[m] = mean_ci(arm.long[m], cfg)
    return out


def window_summary(arm: Arm, cfg: ClaimsParams) -> pd.DataFrame:
    """Per window index: SSIM and identity means over the (clip, seed) units with their intervals."""
    rows = []
    if arm.windows.empty:
        return pd.DataFrame()
    for index, w in arm.windows.groupby("window"):
        row = {"window": int(index), "start_s": float(w["start_s"].min()), "end_s": float(w["end_s"].max())}
        for m in ("ssim", "identity"):
            s = mean_ci(w.set_index(["clip_id", "seed"])[m], cfg)
            row.update({m: s["value"], f"{m}_low": s["low"], f"{m}_high": s["high"], "n": s["n"]})
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ pictures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, x, s: dict, **kwargs) -> None:
    if s.get("value") is None:
        return
    lo, hi = s.get("low"), s.get("high")
    err = None if lo is None else [[s["value"] - lo], [hi - s["value"]]]
    ax.errorbar([x], [s["value"]], yerr=err, fmt="o", capsize=3, **kwargs)


def plot_effects(rows: list[dict], path: Path) -> Path:
    """One panel per metric: each comparison's effect (a - b) with its interval, coloured by verdict;
    the arrow says which side is a's better side."""
    plt = _plt()
    metrics = [m.key for m in METRICS] + ["ssim_decay", "ssim_last", "identity_drift"]
    shown = [m for m in metrics if any(r["metric"] == m and r["kind"] != "trend" and r["source"] != "Table 3"
                                       for r in rows)]
    fig, axes = plt.subplots(math.ceil(max(len(shown), 1) / 3), 3, figsize=(13, 3.2 * math.ceil(max(len(shown), 1) / 3)),
                             squeeze=False)
    for ax, metric in zip(axes.flat, shown):
        mine = [r for r in rows if r["metric"] == metric and r["kind"] != "trend" and r["source"] != "Table 3"]
        for y, r in enumerate(mine):
            if r["effect"] is None:
                ax.text(0, y, "n/a", va="center", fontsize=6)
                continue
            err = [[r["effect"] - r["low"]], [r["high"] - r["effect"]]]
            ax.errorbar([r["effect"]], [y], xerr=err, fmt="o", capsize=3, color=VERDICT_COLOURS[r["verdict"]])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(mine)), [f"{r['a']} - {r['b']}" for r in mine], fontsize=7)
        better = "higher" if LABELS[metric].higher_is_better else "lower"
        ax.set_title(f"{LABELS[metric].label}: a - b ({better} is a's better side)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=v) for v, c in VERDICT_COLOURS.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncols=3)
    fig.suptitle("paired effects with 95% intervals (units: clips x seeds, same noise in both arms)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def plot_sweep(ev: Evidence, summaries: dict[str, dict], path: Path) -> Path:
    """Each metric against alpha with its interval (Figure 7 is the SSIM panels), wo_mta's level and
    interval as a band."""
    plt = _plt()
    panels = [m.key for m in METRICS] + ["ssim_last", "ssim_decay"]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    wo_mta = summaries.get("wo_mta", {})
    for ax, metric in zip(axes.flat, panels):
        for x in ev.alphas:
            s = summaries.get(sweep_name(x), {}).get(metric, {})
            _errorbar(ax, x, s, color="tab:blue")
        level = wo_mta.get(metric, {})
        if level.get("value") is not None:
            ax.axhline(level["value"], color="tab:red", linestyle="--", label="wo_mta (all seeds)")
            if level.get("low") is not None:
                ax.axhspan(level["low"], level["high"], color="tab:red", alpha=0.12)
        arrow = "higher is better" if LABELS[metric].higher_is_better else "lower is better"
        ax.set(xlabel="alpha (Eq. 5)", title=f"{LABELS[metric].label} ({arrow})")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
    fig.suptitle("alpha sweep (stage 3 retrained per alpha), means with 95% intervals over clips; set metrics "
                 "(FID, FVD, E-FID) pooled, no interval", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def plot_windows(ev: Evidence, variants: list[str], cfg: ClaimsParams, path: Path) -> Optional[Path]:
    """Figure 5 across variants: SSIM and identity per long-term window, mean over (clip, seed) with
    its interval as a band."""
    tables = {v: window_summary(ev.arms[v], cfg) for v in variants if v in ev.arms}
    tables = {v: t for v, t in tables.items() if not t.empty}
    if not tables:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for v, t in tables.items():
        mid = (t["start_s"] + t["end_s"]) / 2
        for ax, m in zip(axes, ("ssim", "identity")):
            line = ax.plot(mid, t[m], marker="o", label=v)[0]
            if t[f"{m}_low"].notna().all():
                ax.fill_between(mid, t[f"{m}_low"].astype(float), t[f"{m}_high"].astype(float), alpha=0.15,
                                color=line.get_color())
    axes[0].set(xlabel="seconds into the long video", ylabel="SSIM vs ground truth", title="SSIM per window")
    axes[1].set(xlabel="seconds into the long video", ylabel="dlib distance to the reference (lost face = 1)",
                title="identity per window (lower is closer)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("long-term generation per variant (ablation members, mean over clips x seeds, 95% bands)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path
