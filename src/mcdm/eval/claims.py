"""The paper's claims (Tables 3-5, Figures 5 and 7) answered from our evaluations: for each, our effect,
its confidence interval, how many clips, seeds and frames it rests on, and the verdict
(``mcdm.eval.statistics``: supported / refuted / inconclusive at the measured precision).

Effects are ``a - b`` in the metric's own units (e.g. ``full - wo_mta`` on SSIM); a claim "a beats b"
is supported when the whole interval lies on a's better side (higher SSIM / Sync-C, lower FID / FVD /
Sync-D / E-FID / identity distance / SSIM decay / identity drift). Units are (clip, seed) pairs on
the same clips and generation noise in both arms (``mcdm.eval.claim_inputs``); with several seeds the
bootstrap is two-level (seeds, then units within a seed), otherwise flat over clips.

* per-clip metrics (SSIM, Sync-C, Sync-D, identity) and long-term ones (per long-term clip: SSIM of
  the first / last window, SSIM decay, identity drift): ``paired_difference`` of the units' values;
* set metrics (FID, FVD, E-FID): ``set_level_difference``, the Fréchet distance recomputed on each
  resample of units from their feature rows (generated frames without a face charged as the
  no-face point of the full real set, ``mcdm.eval.failures``);
* trends over alpha (Figure 7): ``trend_verdict`` of the least-squares slope, units = clips;
* claims of one group (an ordering's steps, "every alpha < 0.9") combine by ``conjunction``.

An inconclusive claim states how many units (clips x seeds) the observed effect would need at the
chosen power: ``required_n`` with the per-unit spread implied by the interval,
sd = (high - low) / (2 z) * sqrt(n).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats

from mcdm.config import ClaimsParams, Params
from mcdm.errors import McdmError
from mcdm.eval.ablation_tables import METRICS, Metric
from mcdm.eval.claim_inputs import SET_METRICS, Arm, Evidence, sweep_name
from mcdm.eval.failures import no_face_feature
from mcdm.eval.frechet import frechet_from_features
from mcdm.eval.metric_files import FALLBACK_BACKENDS
from mcdm.eval.statistics import (
    Estimate,
    conjunction,
    paired_difference,
    required_n,
    set_level_difference,
    trend_verdict,
    verdict,
)

LONG_LABELS = {"ssim_decay": Metric("ssim_decay", "SSIM decay (first - last window)", False),
               "ssim_last": Metric("ssim_last", "SSIM of the last window", True),
               "identity_drift": Metric("identity_drift", "identity drift (last - first window)", False)}
LABELS = {m.key: m for m in (*METRICS, Metric("identity", "identity", False))} | LONG_LABELS
TABLE4 = ("full", "wo_mta", "wo_fpc", "wo_fa")


@dataclass(frozen=True)
class Claim:
    """One comparison: ``a`` beats ``b`` on ``metric`` (``b_metric`` for b when it differs), by more than
    ``margin`` in the metric's oriented units (negative: "no worse than by |margin|")."""

    id: str
    source: str
    text: str
    metric: str
    a: str
    b: str
    kind: str  # "unit" (per clip), "set" (Fréchet), "long" (per long-term clip), "trend" (over alpha)
    margin: float = 0.0
    b_metric: Optional[str] = None
    group: Optional[str] = None
    note: str = ""
    trend: str = "decreases"  # a trend claim's direction over alpha

    @property
    def higher_is_better(self) -> bool:
        return LABELS[self.metric].higher_is_better


def _kind(metric: str) -> str:
    return "set" if metric in SET_METRICS else "long" if metric in LONG_LABELS else "unit"


def paper_claims(alphas: list[float]) -> tuple[list[Claim], dict[str, str]]:
    """Every claim and the text of each claim group."""
    c, groups = [], {}
    c += [Claim("T3.sync_c", "Table 3", "the full model beats the static reference on Sync-C", "sync_c", "main",
                "static_reference", "unit", note="decisions.md #20"),
          Claim("T3.fvd", "Table 3", "the full model beats the static reference on FVD", "fvd", "main",
                "static_reference", "set", note="decisions.md #20"),
          Claim("T3.identity", "Table 3", "the full model's identity distance is within 0.05 of ground truth's",
                "identity", "main", "main", "unit", margin=-0.05, b_metric="identity_gt",
                note="decisions.md #20; effect = model - ground truth")]
    for m in METRICS:
        group = f"T4.order.{m.key}"
        groups[group] = f"Table 4 ordering full > wo_mta > wo_fpc > wo_fa on {m.label}"
        for better, worse in zip(TABLE4, TABLE4[1:]):
            c.append(Claim(f"T4.{m.key}.{better}-{worse}", "Table 4", f"{better} beats {worse} on {m.label}", m.key,
                           better, worse, _kind(m.key), group=group))
        c += [Claim(f"T4.{m.key}.full-{v}", "Table 4", f"full beats {v} on {m.label}", m.key, "full", v, _kind(m.key))
              for v in ("wo_fpc", "wo_fa")]
        c += [Claim(f"T5.{m.key}.full-{v}", "Table 5", f"full beats {v} on {m.label}", m.key, "full", v, _kind(m.key))
              for v in ("b1", "b2")]
    c += [Claim("F5.ssim_decay.full-wo_fa", "Figure 5", "with archived frames SSIM decays less over the long video "
                "than without (full vs wo_fa)", "ssim_decay", "full", "wo_fa", "long"),
          Claim("F5.ssim_last.full-wo_fa", "Figure 5", "with archived frames SSIM stays higher at the end of the long "
                "video (full vs wo_fa)", "ssim_last", "full", "wo_fa", "long"),
          Claim("F5.identity_drift.full-wo_fa", "Figure 5", "the full model's identity drifts less than wo_fa's",
                "identity_drift", "full", "wo_fa", "long", note="decisions.md #20"),
          Claim("F5.ssim_decay.full-wo_mta", "Figure 5", "MTA holds SSIM better over the long video than wo_mta",
                "ssim_decay", "full", "wo_mta", "long", note="issue #19's reading of Table 4 / Figure 7")]
    for metric, where in (("ssim", "test clips"), ("ssim_last", "last long-term window")):
        suffix = "" if metric == "ssim" else ".long"
        c.append(Claim(f"F7.trend{suffix}", "Figure 7", f"SSIM ({where}) declines as alpha grows", metric, "sweep",
                       "sweep", "trend", note="slope of SSIM against alpha"))
        group = f"F7.below_0.9{suffix}"
        groups[group] = f"MTA beats wo_mta on SSIM ({where}) at every alpha < 0.9"
        c += [Claim(f"F7.alpha{a:g}-wo_mta{suffix}", "Figure 7", f"MTA at alpha {a:g} beats wo_mta on SSIM ({where})",
                    metric, sweep_name(a), "wo_mta", _kind(metric), group=group) for a in alphas if a < 0.9]
        c.append(Claim(f"F7.wo_mta-alpha0.9{suffix}", "Figure 7", f"wo_mta beats MTA at alpha 0.9 on SSIM ({where})",
                       metric, "wo_mta", sweep_name(0.9), _kind(metric)))
    c.append(Claim("F7.trade", "Figure 7", "more memory (larger alpha) holds SSIM better over the long video: the "
                   "SSIM decay falls as alpha grows", "ssim_decay", "sweep", "sweep", "trend",
                   note="issue #19's reading of 'alpha trades short-term against long-term'; not stated by the paper"))
    return c, groups


# ------------------------------------------------------------------------------------------------ answers
def _table(arm: Arm, kind: str) -> pd.DataFrame:
    return arm.long if kind == "long" else arm.units


def _groups(units: list) -> Optional[list]:
    seeds = [u[1] for u in units]
    return seeds if len(set(seeds)) >= 2 else None


def _frames(arm: Arm, units: list, kind: str) -> int:
    if kind == "long":
        w = arm.windows
        if w.empty:
            return 0
        keys = set(units)
        return int(w.loc[[(c, s) in keys for c, s in zip(w["clip_id"], w["seed"])], "frames"].sum())
    return int(pd.to_numeric(arm.units.loc[units, "n_frames"], errors="coerce").fillna(0).sum()) \
        if "n_frames" in arm.units else 0


def _column(arm: Arm, kind: str, metric: str) -> pd.Series:
    table = _table(arm, kind)
    if metric not in table:
        raise McdmError(f"{arm.name} has no {metric} (no {'long-term windows' if kind == 'long' else 'such column'})")
    return pd.to_numeric(table[metric], errors="coerce")


def _paired(claim: Claim, a: Arm, b: Arm, cfg: ClaimsParams) -> tuple[Estimate, list]:
    sa = _column(a, claim.kind, claim.metric)
    sb = _column(b, claim.kind, claim.b_metric or claim.metric)
    units = [u for u in sa.index if u in sb.index and math.isfinite(sa[u]) and math.isfinite(sb[u])]
    if len(units) < 2:
        raise McdmError(f"{len(units)} unit(s) with a value in both arms: no interval")
    est = paired_difference(sa[units].to_numpy(), sb[units].to_numpy(), pair_ids=(units, units),
                            groups=_groups(units), n_boot=cfg.n_boot, level=cfg.level, seed=cfg.seed)
    return est, units


def _set_level(claim: Claim, a: Arm, b: Arm, cfg: ClaimsParams) -> tuple[Estimate, list]:
    fa, fb = a.features.get(claim.metric), b.features.get(claim.metric)
    if not fa or not fb:
        raise McdmError(f"no {claim.metric} feature rows for {claim.a if not fa else claim.b}")
    units = [u for u in fa["fake"] if u in fb["fake"] and u in fa["real"]]
    if len(units) < 2:
        raise McdmError(f"{len(units)} unit(s) in both arms: no interval")
    real = [fa["real"][u] for u in units]
    zeta = no_face_feature(np.concatenate(real))  # every lost face: the same no-face point of the full real set
    fake = {arm: [np.where(np.isfinite(f["fake"][u]).all(axis=1, keepdims=True), f["fake"][u], zeta) for u in units]
            for arm, f in (("a", fa), ("b", fb))}
    real = [x[np.isfinite(x).all(axis=1)] for x in real]  # ground truth without a face: the data's

    def metric(arm):
        return lambda idx: frechet_from_features(np.concatenate([real[i] for i in idx]),
                                                 np.concatenate([fake[arm][i] for i in idx]))
    est = set_level_difference(metric("a"), metric("b"), len(units), groups=_groups(units), n_boot=cfg.set_level_boot,
                               level=cfg.level, seed=cfg.seed)
    return est, units


def _trend(claim: Claim, ev: Evidence, cfg: ClaimsParams) -> tuple[Estimate, list, str]:
    arms = [ev.arms[sweep_name(x)] for x in ev.alphas if sweep_name(x) in ev.arms]
    if len(arms) < 2:
        raise McdmError("fewer than two sweep members")
    kind = "long" if claim.metric in LONG_LABELS else "unit"
    tables = [_column(arm, kind, claim.metric) for arm in arms]
    units = [u for u in tables[0].index if all(u in t.index and math.isfinite(t[u]) for t in tables)]
    if len(units) < 2:
        raise McdmError(f"{len(units)} unit(s) with a value at every alpha: no interval")
    y = np.array([[t[u] for t in tables] for u in units])
    x = np.array(ev.alphas[: len(arms)])
    v, est = trend_verdict(x, y, claim.trend, groups=_groups(units),
                           n_boot=cfg.n_boot, level=cfg.level, seed=cfg.seed)
    return est, units, v


def _required(effect: float, est: Estimate, claim: Claim, cfg: ClaimsParams) -> Optional[int]:
    """Units (clips x seeds) the observed effect would need for a conclusive interval at ``cfg.power``."""
    z = float(stats.norm.ppf((1 + cfg.level) / 2))
    sd = (est.high - est.low) / (2 * z) * math.sqrt(est.n)
    gap = (1.0 if claim.higher_is_better else -1.0) * effect - claim.margin
    if claim.kind == "trend" or gap == 0 or not sd > 0 or not math.isfinite(gap):
        return None
    try:
        return required_n(gap, sd, level=cfg.level, power=cfg.power)
    except McdmError:
        return None


def _backend(claim: Claim, ev: Evidence) -> Optional[str]:
    key = claim.metric.split("_")[0] if claim.metric in LONG_LABELS else claim.metric
    for name in (claim.a, claim.b, "full", "main", *(sweep_name(x) for x in ev.alphas)):
        label = ev.arms[name].backends.get(key) if name in ev.arms else None
        if label:
            return label
    return None


def answer(claim: Claim, ev: Evidence, cfg: ClaimsParams) -> dict:
    """One claim's row: effect (a - b; a trend's slope), CI, n, frames, verdict, units needed, note."""
    row = {**{k: v for k, v in asdict(claim).items() if k != "group"}, "group": claim.group,
           "effect": None, "low": None, "high": None, "level": cfg.level, "method": None, "n_units": 0, "n_clips": 0,
           "n_seeds": 0, "frames_a": 0, "frames_b": 0, "verdict": "inconclusive", "required_units": None,
           "higher_is_better": claim.higher_is_better, "label": LABELS[claim.metric].label}
    backend = _backend(claim, ev)
    row.update(backend=backend, fallback=bool(backend) and any(b in backend for b in FALLBACK_BACKENDS))
    a, b = ev.arms.get(claim.a), ev.arms.get(claim.b)
    try:
        if claim.kind == "trend":
            est, units, v = _trend(claim, ev, cfg)
        else:
            if a is None or b is None:
                raise McdmError(f"no evaluation of {claim.a if a is None else claim.b}")
            est, units = (_set_level if claim.kind == "set" else _paired)(claim, a, b, cfg)
            v = verdict(est, claim.higher_is_better, claim.margin)
    except McdmError as err:
        row["note"] = "; ".join(filter(None, [row["note"], f"not answered: {err}"]))
        return row
    if len(units) < cfg.min_units:
        v = "inconclusive"
        row["note"] = "; ".join(filter(None, [row["note"], f"{len(units)} units < eval.claims.min_units "
                                                           f"{cfg.min_units}: no verdict"]))
    row.update(effect=est.value, low=est.low, high=est.high, method=est.method, n_units=len(units),
               n_clips=len({u[0] for u in units}), n_seeds=len({u[1] for u in units}), verdict=v)
    if a is not None and b is not None and claim.kind != "trend":
        row.update(frames_a=_frames(a, units, claim.kind), frames_b=_frames(b, units, claim.kind))
    if v == "inconclusive":
        row["required_units"] = _required(est.value, est, claim, cfg)
    return row


def answer_all(ev: Evidence, params: Params) -> dict:
    """Every claim's row and every group's verdict (``conjunction`` of its members)."""
    claims, texts = paper_claims(ev.alphas)
    rows = [answer(c, ev, params.eval.claims) for c in claims]
    groups = []
    for gid, text in texts.items():
        members = [r for r in rows if r["group"] == gid]
        if members:
            groups.append({"id": gid, "claim": text, "members": [r["id"] for r in members],
                           "verdict": conjunction([r["verdict"] for r in members])})
    return {"claims": rows, "groups": groups, "missing": ev.missing, "alphas": ev.alphas,
            "level": params.eval.claims.level}
