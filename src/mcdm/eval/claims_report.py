"""The ``claims`` stage: every claim of the paper's Tables 3-5 and Figures 5 and 7 answered
(``mcdm.eval.claims``), written as ``claims.md`` and its machine-readable twin ``claims.json``, with the
pictures that show the intervals (``mcdm.eval.claim_figures``).

``claims.json``: ``claims`` (a row per claim: id, source, claim text, metric, arms a and b, effect
= a - b, low / high at ``level``, method, units, clips, seeds, frames of a and b, verdict, units an
inconclusive effect would need, backend, fallback, note), ``groups`` (orderings and "every alpha"
claims: their members' conjunction), ``arms`` (per arm and metric: mean with interval, or the pooled
Fréchet distance), ``windows`` (per variant and long-term window: SSIM and identity with intervals),
``missing`` (expected inputs not found) and the settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mcdm.config import Params
from mcdm.eval.ablation_tables import empty_figure, fmt, md_table
from mcdm.eval.claim_figures import arm_summary, plot_effects, plot_sweep, plot_windows, window_summary
from mcdm.eval.claim_inputs import load_evidence
from mcdm.eval.claims import answer_all
from mcdm.media.files import jsonable, write_json, write_text

OUTPUTS = ("claims.md", "claims.json", "claims_effects.png", "alpha_sweep.png", "long_term_variants.png")
SOURCES = ("Table 3", "Table 4", "Table 5", "Figure 5", "Figure 7")


def _ci(r: dict) -> str:
    return "n/a" if r["low"] is None else f"[{fmt(r['low'], 3)}, {fmt(r['high'], 3)}]"


def _n(r: dict) -> str:
    if not r["n_units"]:
        return "0"
    frames = f"; frames {r['frames_a']} / {r['frames_b']}" if r["frames_a"] else ""
    return f"{r['n_units']} ({r['n_clips']} clips x {r['n_seeds']} seeds{frames})"


def _note(r: dict) -> str:
    parts = []
    if r.get("backend"):
        parts.append(("fallback " if r["fallback"] else "") + f"`{r['backend']}`")
    if r.get("required_units"):
        parts.append(f"~{r['required_units']} units would settle the observed effect")
    if r.get("note"):
        parts.append(r["note"])
    return "; ".join(parts)


def _effect(r: dict) -> str:
    if r["kind"] == "trend":
        return f"{fmt(r['effect'], 3)} per unit alpha (slope)"
    if r["a"] == r["b"]:
        return f"{fmt(r['effect'], 3)} ({r['a']}: {r['metric']} - {r['b_metric']})"
    return f"{fmt(r['effect'], 3)} ({r['a']} - {r['b']})"


def claim_table(rows: list[dict]) -> str:
    body = [[r["text"], f"{r['label']} ({'↑' if r['higher_is_better'] else '↓'})", _effect(r),
             _ci(r), _n(r), f"**{r['verdict']}**", _note(r)] for r in rows]
    return md_table(["claim", "metric", "our effect", "95% CI", "n: units (clips x seeds)", "verdict", "note"], body)


def claims_markdown(result: dict, params: Params) -> str:
    rows, groups = result["claims"], result["groups"]
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("supported", "refuted", "inconclusive")}
    cfg = params.eval.claims
    lines = ["# The paper's claims, answered at our measured precision", "",
             "Written by `mcdm claims` from the evaluations of the main line (`reports/`) and of the ablation and "
             "sweep members (`reports/ablations/`). Each row: the claim, the metric (↑ higher / ↓ lower is better), "
             "our effect a - b in the metric's units, its "
             f"{cfg.level:.0%} percentile-bootstrap interval ({cfg.n_boot} resamples; {cfg.set_level_boot} for the "
             "set metrics FID, FVD and E-FID, recomputed on each resample of clips), the units it rests on (a unit "
             "is one test clip at one seed, generated with the same noise in both arms; two-level bootstrap over "
             "seeds when there are several), and the verdict: **supported** (the whole interval on the claimed "
             "side), **refuted** (the whole interval on the other side) or **inconclusive**. Numbers measured "
             "by a labelled fallback (dlib features instead of Inception / I3D / Deep3DFaceRecon, the SyncNet "
             "trained here instead of the official one) are marked `fallback`: their scale is not the paper's, "
             "only the direction compares. The paper's own values are in `report.md`, in their own table.", "",
             f"Verdicts: {counts['supported']} supported, {counts['refuted']} refuted, {counts['inconclusive']} "
             "inconclusive.", ""]
    for source in SOURCES:
        mine = [r for r in rows if r["source"] == source]
        if not mine:
            continue
        lines += [f"## {source}", ""]
        mine_groups = [g for g in groups if g["id"].startswith(mine[0]["id"].split(".")[0] + ".")]
        if mine_groups:
            lines += [md_table(["combined claim", "steps", "verdict (all steps)"],
                               [[g["claim"], ", ".join(g["members"]), f"**{g['verdict']}**"] for g in mine_groups]), ""]
        lines += [claim_table(mine), ""]
    needs = [r for r in rows if r.get("required_units")]
    if needs:
        largest = max(needs, key=lambda r: r["required_units"])
        lines += ["## What the budget cannot settle", "",
                  f"{len(needs)} inconclusive claims have a non-zero observed effect; at that effect and the spread "
                  f"the interval implies, a test at {cfg.level:.0%} with power {cfg.power:.0%} would need between "
                  f"{min(r['required_units'] for r in needs)} and {largest['required_units']} units (clips x seeds; "
                  f"the most for '{largest['text']}'). Larger settings are one params change away: "
                  "`ablations.seeds` (e.g. `[0, 1, 2, 3, 4]`), `ablations.eval` (`max_test_clips`, `clip_seconds`), "
                  "`eval.max_test_clips`, `sweep.alphas`.", ""]
    if result["missing"]:
        lines += ["## Missing inputs", "", *[f"- {m}" for m in result["missing"]], ""]
    lines += ["![paired effects with their intervals](claims_effects.png)", "",
              "![alpha sweep with intervals](alpha_sweep.png)", "", "![long-term windows per variant](long_term_variants.png)", ""]
    return "\n".join(lines)


def write_claims(main_dir: str | Path, members_dir: str | Path, params: Params, out_dir: str | Path) -> dict:
    """Run the stage: read the evaluations, answer the claims, write ``OUTPUTS`` into ``out_dir``."""
    out_dir = Path(out_dir)
    ev = load_evidence(main_dir, members_dir, params)
    result = answer_all(ev, params)
    cfg = params.eval.claims
    summaries = {name: arm_summary(arm, cfg) for name, arm in ev.arms.items()}
    variants = [v for v in params.ablations.variants if v in ev.arms]
    windows = {v: window_summary(ev.arms[v], cfg).to_dict("records") for v in variants}
    result.update(arms=summaries, windows=windows, settings=cfg.model_dump(),
                  seeds=list(params.ablations.seeds), members_eval=dict(params.ablations.eval))
    plot_effects(result["claims"], out_dir / "claims_effects.png")
    plot_sweep(ev, summaries, out_dir / "alpha_sweep.png")
    if plot_windows(ev, variants, cfg, out_dir / "long_term_variants.png") is None:
        empty_figure("no long-term windows from any ablation member", out_dir / "long_term_variants.png")
    write_json(jsonable(result), out_dir / "claims.json")
    write_text(claims_markdown(result, params) + "\n", out_dir / "claims.md")
    return result


def verdict_counts(result: Optional[dict]) -> dict[str, int]:
    rows = (result or {}).get("claims", [])
    return {v: sum(r["verdict"] == v for r in rows) for v in ("supported", "refuted", "inconclusive")}
