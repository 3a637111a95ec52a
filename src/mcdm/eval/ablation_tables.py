"""The ablation matrix (paper Tables 4-5) and the alpha sweep (Figure 7) from the members' metrics:
mean and standard deviation over seeds per variant, the paper's orderings, the alpha curve."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from mcdm.config import Params
from mcdm.eval.plots import plot_long_term
from mcdm.media.files import save_figure


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool


METRICS = (Metric("fid", "FID", False), Metric("fvd", "FVD", False), Metric("sync_c", "Sync-C", True),
           Metric("sync_d", "Sync-D", False), Metric("ssim", "SSIM", True), Metric("efid", "E-FID", False))
IDENTITY = Metric("identity", "identity", False)  # not in the paper's tables (decisions.md #20)
PAPER_ORDER = ("full", "wo_mta", "wo_fpc", "wo_fa")
# paper Table 3 (MCDM on TalkingFace-Wild) = the "full" rows of Tables 4 and 5
PAPER_TABLE3 = {"fid": 42.08, "fvd": 656.71, "sync_c": 7.84, "sync_d": 6.69, "ssim": 0.779, "efid": 1.97}
PAPER_VARIANTS = {  # Tables 4 (wo_fa, wo_fpc, wo_mta) and 5 (b1, b2)
    "full": PAPER_TABLE3,
    "wo_fa": {"fid": 46.25, "fvd": 708.93, "sync_c": 7.37, "sync_d": 7.05, "ssim": 0.749, "efid": 2.25},
    "wo_fpc": {"fid": 45.63, "fvd": 684.20, "sync_c": 7.49, "sync_d": 6.97, "ssim": 0.758, "efid": 2.13},
    "wo_mta": {"fid": 44.27, "fvd": 671.05, "sync_c": 7.62, "sync_d": 6.84, "ssim": 0.771, "efid": 2.04},
    "b1": {"fid": 42.49, "fvd": 668.24, "sync_c": 7.69, "sync_d": 6.78, "ssim": 0.771, "efid": 2.02},
    "b2": {"fid": 47.12, "fvd": 721.17, "sync_c": 7.30, "sync_d": 6.84, "ssim": 0.732, "efid": 2.29},
}
PAPER_MEANING = {
    "full": "the full model (members' budget)", "wo_fa": "no archived frames (Table 4)",
    "wo_fpc": "present-clip prior replaced by audio attention (Table 4)",
    "wo_mta": "softmax temporal attention, no memory (Table 4)", "b1": "Q-Former for frame-aligned attention (Table 5)",
    "b2": "reference UNet, no archived clip (Table 5)",
}


# ------------------------------------------------------------------------------------------- reading
def read_json(path: str | Path) -> Optional[dict]:
    """The JSON object at ``path``, or None when the file is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def load_members(folder: str | Path) -> list[dict]:
    """Every ``<folder>/*/metrics.json`` written by ``mcdm ablate`` (those with a ``member`` block),
    with ``_path`` set to its folder."""
    members = []
    for path in sorted(Path(folder).glob("*/metrics.json")):
        m = read_json(path)
        if m and isinstance(m.get("member"), dict):
            members.append({**m, "_path": str(path.parent)})
    return members


def select_members(members: list[dict], params: Params) -> tuple[list[dict], list[dict], list[str], list[str]]:
    """(ablation members, sweep members, missing members, ignored folders) against the params' matrix:
    ``ablations.variants`` x ``ablations.seeds`` and ``sweep.alphas``. Members of other values (stale
    folders of an earlier matrix) are ignored and listed."""
    wanted = {(v, s) for v in params.ablations.variants for s in params.ablations.seeds}
    alphas = list(params.sweep.alphas)
    ablation, sweep, ignored = [], [], []
    for m in members:
        info = m["member"]
        if info.get("kind") == "ablation" and (info.get("variant"), info.get("seed")) in wanted:
            ablation.append(m)
        elif info.get("kind") == "sweep" and any(math.isclose(info.get("alpha", -1.0), a) for a in alphas):
            sweep.append(m)
        else:
            ignored.append(m["_path"])
    have = {(m["member"]["variant"], m["member"]["seed"]) for m in ablation}
    missing = [f"ablation member variant={v} seed={s}" for v in params.ablations.variants for s in params.ablations.seeds
               if (v, s) not in have]
    missing += [f"sweep member alpha={a}" for a in alphas
                if not any(math.isclose(m["member"]["alpha"], a) for m in sweep)]
    return ablation, sweep, missing, ignored


# ------------------------------------------------------------------------------------------- maths
def mean_std(values: Iterable[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """(mean, sample std with ddof 1 or None below two values, n) of the finite values."""
    x = np.array([v for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    if not len(x):
        return None, None, 0
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else None, int(len(x))


def _backend(members: Sequence[dict], key: str) -> Optional[str]:
    labels = sorted({str(m[f"{key}_backend"]) for m in members if m.get(f"{key}_backend")})
    return " / ".join(labels) if labels else None


def variant_rows(members: list[dict], variants: Sequence[str]) -> list[dict]:
    """One row per variant (in ``variants`` order, those with members): seeds, and per metric the
    mean, std, n and backend label; the members' params hashes."""
    rows = []
    for variant in variants:
        ms = sorted((m for m in members if m["member"]["variant"] == variant), key=lambda m: m["member"]["seed"])
        if not ms:
            continue
        row = {"variant": variant, "n_members": len(ms), "seeds": " ".join(str(m["member"]["seed"]) for m in ms),
               "retrained_stages": " ".join(str(k) for k in ms[0]["member"]["retrained_stages"])}
        for metric in (*METRICS, IDENTITY):
            mean, std, n = mean_std(m.get(metric.key) for m in ms)
            row.update({f"{metric.key}_mean": mean, f"{metric.key}_std": std, f"{metric.key}_n": n,
                        f"{metric.key}_backend": _backend(ms, metric.key)})
            if metric.key in PAPER_VARIANTS.get(variant, {}):
                row[f"paper_{metric.key}"] = PAPER_VARIANTS[variant][metric.key]
        drift = mean_std((m.get("long_term") or {}).get("identity_drift") for m in ms)
        row["long_term_identity_drift_mean"] = drift[0]
        row["params_hashes"] = " ".join(str(m.get("params_hash")) for m in ms)
        rows.append(row)
    return rows


def ordering(means: dict[str, Optional[float]], metric: Metric, order: Sequence[str] = PAPER_ORDER) -> dict:
    """Whether ``order`` (best first) holds on ``metric`` for these variant means, strictly; the
    variants we have, ranked best first; and the variants that lack a value."""
    missing = [v for v in order if means.get(v) is None]
    have = [v for v in order if means.get(v) is not None]
    ranked = sorted(have, key=lambda v: means[v], reverse=metric.higher_is_better)
    if missing:
        return {"holds": None, "ranked": ranked, "missing": missing}
    better = (lambda a, b: a > b) if metric.higher_is_better else (lambda a, b: a < b)
    holds = all(better(means[a], means[b]) for a, b in zip(order, order[1:]))
    return {"holds": holds, "ranked": ranked, "missing": []}


def ordering_line(rows: list[dict], metric: Metric, order: Sequence[str] = PAPER_ORDER) -> str:
    means = {r["variant"]: r.get(f"{metric.key}_mean") for r in rows}
    result = ordering(means, metric, order)
    sign = " > ".join(order)
    if result["holds"] is None:
        return f"- {metric.label}: cannot say, no value for {', '.join(result['missing'])}"
    ranked = result["ranked"]
    ours = ranked[0] + "".join((" = " if means[a] == means[b] else " > ") + b for a, b in zip(ranked, ranked[1:]))
    verdict = "holds" if result["holds"] else "does not hold"
    return f"- {metric.label}: the paper's ordering {sign} {verdict} (ours, best first: {ours})"


def sweep_rows(members: list[dict]) -> list[dict]:
    rows = []
    for m in sorted(members, key=lambda m: m["member"]["alpha"]):
        row = {"alpha": m["member"]["alpha"], "member": m["member"]["name"], "seed": m["member"]["seed"],
               "params_hash": m.get("params_hash"), "retrained_stages": " ".join(map(str, m["member"]["retrained_stages"]))}
        for metric in (*METRICS, IDENTITY):
            row[metric.key] = m.get(metric.key)
            row[f"{metric.key}_backend"] = m.get(f"{metric.key}_backend")
        row["wall_s"] = m["member"].get("wall_s")
        rows.append(row)
    return rows


def sweep_claims(rows: list[dict], wo_mta: Optional[float]) -> list[str]:
    """Figure 7 read against our SSIM: does it decline as alpha grows; is MTA above wo_mta for
    alpha < 0.9 and below it at 0.9."""
    pts = [(r["alpha"], r["ssim"]) for r in rows if r.get("ssim") is not None]
    if len(pts) < 2:
        return ["- SSIM against alpha: fewer than two sweep members with SSIM, nothing to read"]
    a, s = np.array(pts, dtype=np.float64).T
    rho = pd.Series(a).corr(pd.Series(s), method="spearman")
    shape = "falls at every step" if (np.diff(s) < 0).all() else "does not fall at every step"
    lines = [f"- SSIM declines as alpha grows (paper): ours {fmt(float(s[0]))} at alpha {a[0]:g} -> "
             f"{fmt(float(s[-1]))} at alpha {a[-1]:g}, {shape} (Spearman rho {fmt(float(rho), 2)})"]
    if wo_mta is None:
        lines.append("- MTA vs wo_mta: no wo_mta member, no level to compare with")
        return lines
    below = [f"{x:g}" for x, y in pts if x < 0.9 and y <= wo_mta]
    above = [f"{x:g}" for x, y in pts if x < 0.9 and y > wo_mta]
    lines.append(f"- MTA above wo_mta (SSIM {fmt(wo_mta)}) for every alpha < 0.9 (paper: yes): ours above at alpha "
                 f"{', '.join(above) or 'none'}; at or below at {', '.join(below) or 'none'}")
    at_09 = [y for x, y in pts if math.isclose(x, 0.9)]
    if at_09:
        lines.append(f"- alpha 0.9 below wo_mta (paper: yes): ours {'yes' if at_09[0] < wo_mta else 'no'} "
                     f"({fmt(at_09[0])} vs {fmt(wo_mta)})")
    return lines


# ------------------------------------------------------------------------------------------- writing
def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.{digits}g}"


def fmt_mean_std(mean, std) -> str:
    return fmt(mean) if std is None or mean is None else f"{fmt(mean)} ± {fmt(std, 2)}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def empty_figure(text: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2))
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.axis("off")
    save_figure(fig, path, dpi=110)
    return path


def plot_sweep(rows: list[dict], wo_mta: dict[str, Optional[float]], path: Path) -> Path:
    """Each metric against alpha (Figure 7 is SSIM), the wo_mta level as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for ax, metric in zip(axes.flat, METRICS):
        pts = [(r["alpha"], r[metric.key]) for r in rows if r.get(metric.key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label="MCDM (MTA)")
        if wo_mta.get(metric.key) is not None:
            ax.axhline(wo_mta[metric.key], color="tab:red", linestyle="--", label="wo_mta")
        backend = next((r[f"{metric.key}_backend"] for r in rows if r.get(f"{metric.key}_backend")), None)
        arrow = "higher is better" if metric.higher_is_better else "lower is better"
        ax.set(xlabel="alpha (Eq. 5)", ylabel=metric.label, title=f"{metric.label} ({arrow})")
        if backend:
            ax.set_title(f"{metric.label} ({arrow})\n{backend}", fontsize=7)
        ax.grid(alpha=0.3)
        if pts or wo_mta.get(metric.key) is not None:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("alpha sweep (stage 3 retrained per alpha; paper Figure 7 is the SSIM panel)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def plot_variant_curves(members: list[dict], variants: Sequence[str], path: Path) -> Optional[Path]:
    """Figure 5 across variants: each variant's long-term curve (mean over its seeds)."""

    curves = {}
    for variant in variants:
        tables = [pd.read_csv(Path(m["_path"]) / "long_term.csv") for m in members
                  if m["member"]["variant"] == variant and (Path(m["_path"]) / "long_term.csv").is_file()]
        if tables:
            curves[variant] = pd.concat(tables).groupby("frame", as_index=False).mean()
    if not curves:
        return None
    return plot_long_term(curves, path, title="long-term generation per variant (ablation members, mean over seeds)")


def ablations_markdown(rows: list[dict], members: list[dict], sweep: list[dict], params: Params) -> str:
    metric_head = [f"{m.label} ({'↑' if m.higher_is_better else '↓'})" for m in METRICS]
    lines = ["# Ablations and design variants (paper Tables 4-5)", "",
             f"Each row: mean ± sample std over the seeds of its members (`mcdm ablate`), each retrained at "
             f"{params.ablations.steps_fraction:g} of each stage's steps at alpha {params.ablations.alpha:g} and "
             f"evaluated with `{json.dumps(params.ablations.eval)}` over the main line's eval settings; beside "
             "it (after /) the paper's number. The `full` row is the full model retrained at that same budget, "
             "not the main line.", ""]
    body = []
    for r in rows:
        cells = [f"{fmt_mean_std(r[f'{m.key}_mean'], r[f'{m.key}_std'])} / {fmt(r.get(f'paper_{m.key}'))}" for m in METRICS]
        body.append([r["variant"], PAPER_MEANING.get(r["variant"], ""), r["seeds"], r["retrained_stages"], *cells,
                     fmt_mean_std(r["identity_mean"], r["identity_std"])])
    lines.append(md_table(["variant", "meaning", "seeds", "retrained stages", *metric_head, "identity (↓)"], body))
    backends = [f"{m.label}: `{next((r[f'{m.key}_backend'] for r in rows if r.get(f'{m.key}_backend')), 'n/a')}`"
                for m in (*METRICS, IDENTITY)]
    lines += ["", "Backends: " + "; ".join(backends) + ".", "",
              "Whether the paper's ordering (full > wo_mta > wo_fpc > wo_fa, Table 4) holds on our means:", ""]
    lines += [ordering_line(rows, m) for m in METRICS]
    shares = [r["variant"] for r in rows if r["retrained_stages"] != "1 2 3"]
    if shares:
        which = " and ".join(f"{r['variant']} (stages {r['retrained_stages']})" for r in rows if r["variant"] in shares)
        lines += ["", f"Caveat: {which} retrain only those stages and take the others from the main line (trained "
                  "at the full step count), while `full`, wo_fa, b1 and b2 retrain all three at the members' budget."]
        same = [s for s in sweep if math.isclose(s["member"]["alpha"], params.ablations.alpha)]
        if same:
            s = same[0]
            lines.append(f"The like-for-like reference of a stage-3-only member is the sweep member at alpha "
                         f"{params.ablations.alpha:g} (`{s['member']['name']}`: the full model, stage 3 only, same "
                         f"budget): " + ", ".join(f"{m.label} {fmt(s.get(m.key))}" for m in METRICS) + ".")
    lines += ["", "## Members", ""]
    member_rows = [[m["member"]["name"], m["member"]["variant"], m["member"]["seed"], fmt(m["member"]["alpha"]),
                    " ".join(map(str, m["member"]["retrained_stages"])),
                    *[fmt(m.get(x.key)) for x in (*METRICS, IDENTITY)], f"`{m.get('params_hash')}`",
                    fmt(m["member"].get("wall_s"))] for m in members]
    lines.append(md_table(["member", "variant", "seed", "alpha", "retrained", *[m.label for m in (*METRICS, IDENTITY)],
                           "params hash", "wall s"], member_rows))
    return "\n".join(lines) + "\n"
