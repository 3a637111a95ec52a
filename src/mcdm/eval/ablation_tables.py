"""The ablation matrix (paper Tables 4-5) and the alpha sweep (Figure 7) as tables: the members, each
variant's and each alpha's means with their 95% intervals (from the claims stage's ``claims.json``,
``mcdm.eval.claims_report``), and the paper's own numbers, which stay in their own table: our numbers
come from other networks, data and scales, so only orderings compare, never values."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from mcdm.config import Params
from mcdm.eval.metric_files import DETAILS_JSON
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
    """Every ``<folder>/*/metrics_details.json`` written by ``mcdm ablate`` (those with a ``member``
    block), with ``_path`` set to its folder."""
    members = []
    for path in sorted(Path(folder).glob(f"*/{DETAILS_JSON}")):
        m = read_json(path)
        if m and isinstance(m.get("member"), dict):
            members.append({**m, "_path": str(path.parent)})
    return members


def select_members(members: list[dict], params: Params) -> tuple[list[dict], list[dict], list[str], list[str]]:
    """(ablation members, sweep members, missing members, ignored folders) against the params' matrix:
    ``ablations.variants`` x ``ablations.seeds`` and ``sweep.alphas``. Members of other values (stale
    folders of an earlier matrix) and folders not named as the matrix names its member (a copy under
    another name) are ignored and listed."""
    wanted = {(v, s) for v in params.ablations.variants for s in params.ablations.seeds}
    alphas = list(params.sweep.alphas)
    ablation, sweep, ignored = [], [], []
    for m in members:
        info = m["member"]
        named = Path(m["_path"]).name == info.get("name", Path(m["_path"]).name)
        if named and info.get("kind") == "ablation" and (info.get("variant"), info.get("seed")) in wanted:
            ablation.append(m)
        elif named and info.get("kind") == "sweep" and any(math.isclose(info.get("alpha", -1.0), a) for a in alphas):
            sweep.append(m)
        else:
            ignored.append(m["_path"])
    have = {(m["member"]["variant"], m["member"]["seed"]) for m in ablation}
    missing = [f"ablation member variant={v} seed={s}" for v in params.ablations.variants for s in params.ablations.seeds
               if (v, s) not in have]
    missing += [f"sweep member alpha={a}" for a in alphas
                if not any(math.isclose(m["member"]["alpha"], a) for m in sweep)]
    return ablation, sweep, missing, ignored


# ------------------------------------------------------------------------------------------- tables
ARM_METRICS = (*METRICS, IDENTITY)
LONG_TERM = (Metric("ssim_decay", "long-term SSIM decay", False), Metric("identity_drift", "long-term identity drift", False))


def _cell(s: Optional[dict]) -> dict:
    s = s or {}
    return {"mean": s.get("value"), "low": s.get("low"), "high": s.get("high"), "n": s.get("n")}


def variant_rows(claims: Optional[dict], members: list[dict], variants: Sequence[str]) -> list[dict]:
    """One row per variant with members (``variants`` order): seeds, retrained stages, and per metric
    the mean over (clip, seed) units with its interval (set metrics: the pooled distance) and backend."""
    arms = (claims or {}).get("arms", {})
    rows = []
    for variant in variants:
        ms = sorted((m for m in members if m["member"]["variant"] == variant), key=lambda m: m["member"]["seed"])
        if not ms:
            continue
        row = {"variant": variant, "n_members": len(ms), "seeds": " ".join(str(m["member"]["seed"]) for m in ms),
               "retrained_stages": " ".join(str(k) for k in ms[0]["member"]["retrained_stages"])}
        for metric in (*ARM_METRICS, *LONG_TERM):
            row.update({f"{metric.key}_{k}": v for k, v in _cell(arms.get(variant, {}).get(metric.key)).items()})
            labels = sorted({str(m.get(f"{metric.key}_backend")) for m in ms if m.get(f"{metric.key}_backend")})
            row[f"{metric.key}_backend"] = " / ".join(labels) or None
        row["units"] = row.get("ssim_n")  # (clip, seed) units behind the per-clip metrics
        row["params_hashes"] = " ".join(str(m.get("params_hash")) for m in ms)
        rows.append(row)
    return rows


def sweep_rows(claims: Optional[dict], members: list[dict]) -> list[dict]:
    """One row per sweep member (by alpha): each metric's mean with its interval."""
    arms = (claims or {}).get("arms", {})
    rows = []
    for m in sorted(members, key=lambda m: m["member"]["alpha"]):
        row = {"alpha": m["member"]["alpha"], "member": m["member"]["name"], "seed": m["member"]["seed"],
               "params_hash": m.get("params_hash")}
        for metric in (*ARM_METRICS, *LONG_TERM):
            row.update({f"{metric.key}_{k}": v for k, v in _cell(arms.get(f"alpha={m['member']['alpha']:g}", {})
                                                                 .get(metric.key)).items()})
        row["wall_s"] = m["member"].get("wall_s")
        rows.append(row)
    return rows


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.{digits}g}"


def fmt_ci(row: dict, key: str) -> str:
    """``mean [low, high]`` (``mean`` alone for a pooled set metric)."""
    mean, low, high = row.get(f"{key}_mean"), row.get(f"{key}_low"), row.get(f"{key}_high")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return fmt(mean) if low is None or high is None else f"{fmt(mean)} [{fmt(low, 3)}, {fmt(high, 3)}]"


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


def paper_table() -> list[str]:
    """The paper's Tables 3-5 (TalkingFace-Wild) in their own table, beside nothing of ours."""
    rows = [[v, PAPER_MEANING[v], *[fmt(PAPER_VARIANTS[v][m.key]) for m in METRICS]] for v in PAPER_VARIANTS]
    head = [f"{m.label} ({'↑' if m.higher_is_better else '↓'})" for m in METRICS]
    return [md_table(["paper's variant", "meaning", *head], rows)]


def ablations_markdown(rows: list[dict], members: list[dict], params: Params, claims: Optional[dict]) -> str:
    metric_head = [f"{m.label} ({'↑' if m.higher_is_better else '↓'})" for m in (*ARM_METRICS, *LONG_TERM)]
    level = (claims or {}).get("level", 0.95)
    lines = ["# Ablations and design variants (paper Tables 4-5)", "",
             f"Each row: the variant's members (`mcdm ablate`, seeds {list(params.ablations.seeds)}), each retrained at "
             f"{params.ablations.steps_fraction:g} of each stage's steps at alpha {params.ablations.alpha:g} and evaluated "
             f"with `{json.dumps(params.ablations.eval)}` over the main line's eval settings. Per-clip metrics: the mean "
             f"over (clip, seed) units with its {level:.0%} bootstrap interval; FID, FVD and E-FID: the distance pooled "
             "over all units (their paired differences have intervals in `claims.md`). The `full` row is the full "
             "model retrained at that same budget, not the main line. The paper's numbers are in their own table "
             "below and in `report.md`: they come from other networks and data, so only orderings compare.", ""]
    body = [[r["variant"], PAPER_MEANING.get(r["variant"], ""), r["seeds"], fmt(r.get("units")), r["retrained_stages"],
             *[fmt_ci(r, m.key) for m in (*ARM_METRICS, *LONG_TERM)]] for r in rows]
    lines.append(md_table(["variant", "meaning", "seeds", "units (clips x seeds)", "retrained stages", *metric_head], body))
    backends = [f"{m.label}: `{next((r[f'{m.key}_backend'] for r in rows if r.get(f'{m.key}_backend')), 'n/a')}`"
                for m in ARM_METRICS]
    lines += ["", "Backends: " + "; ".join(backends) + ".", ""]
    shares = [r for r in rows if r["retrained_stages"] != "1 2 3"]
    if shares:
        which = " and ".join(f"{r['variant']} (stages {r['retrained_stages']})" for r in shares)
        lines += [f"Caveat: {which} retrain only those stages and take the others from the main line (trained at the "
                  "full step count), while `full`, wo_fa, b1 and b2 retrain all three at the members' budget.", ""]
    lines += ["## The paper's numbers (TalkingFace-Wild)", "", *paper_table(), "", "## Members", ""]
    member_rows = [[m["member"]["name"], m["member"]["variant"], m["member"]["seed"], fmt(m["member"]["alpha"]),
                    " ".join(map(str, m["member"]["retrained_stages"])),
                    *[fmt(m.get(x.key)) for x in ARM_METRICS], fmt(m.get("failure_rate")), f"`{m.get('params_hash')}`",
                    fmt(m["member"].get("wall_s"))] for m in members]
    lines.append(md_table(["member", "variant", "seed", "alpha", "retrained", *[m.label for m in ARM_METRICS],
                           "face failure rate", "params hash", "wall s"], member_rows))
    return "\n".join(lines) + "\n"
