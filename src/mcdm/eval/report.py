"""The report (decisions.md #23): the main line beside the paper, the ablation and variant tables, the
alpha sweep, the long-term curves, the data and training numbers.

Every number comes from a file the pipeline wrote (``reports/metrics.json``, the matrix members'
``metrics.json``, ``reports/train_stage*.json``, ``reports/data_pipeline.json``, the open-set summary
``reports/open_set.json`` and the token figures' ``reports/token_figures.json``) and is printed with
its backend label and the params hash that produced it; an input that is not there is listed as
missing, never filled in. The paper's numbers are its Tables 3-5 (TalkingFace-Wild).

Maths:
* a variant's row is the mean and the sample standard deviation (ddof = 1; none for one seed) of
  its members' values over the seeds, each metric over the members that have it;
* the paper's ordering full > wo_mta > wo_fpc > wo_fa holds on a metric when each variant's mean is
  strictly better than the next one's (lower FID / FVD / Sync-D / E-FID, higher Sync-C / SSIM);
* the alpha sweep's wo_mta level is the mean of the wo_mta members (no memory: alpha plays no part);
* the open set's "open set minus test" differences subtract the test split's pooled value
  (``metrics.json``) from the open set's mean over all pairs, per metric, where both exist.

Outputs (in ``out``): ``ablations.csv`` (a row per variant), ``ablations.md``, ``alpha_sweep.csv``
(a row per alpha), ``alpha_sweep.png``, ``long_term_variants.png`` and ``report.md``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from mcdm.config import Params
from mcdm.eval.ablation_tables import (
    IDENTITY,
    METRICS,
    PAPER_TABLE3,
    Metric,
    ablations_markdown,
    empty_figure,
    fmt,
    fmt_mean_std,
    load_members,
    md_table,
    mean_std,
    ordering_line,
    plot_sweep,
    plot_variant_curves,
    read_json,
    select_members,
    sweep_claims,
    sweep_rows,
    variant_rows,
)
from mcdm.media.files import write_csv, write_text

OUTPUTS = ("ablations.csv", "ablations.md", "alpha_sweep.csv", "alpha_sweep.png", "long_term_variants.png", "report.md")


def _inputs_table(found: dict[str, Optional[str]]) -> list[str]:
    return [f"- `{path}`: {'read' if ok else 'MISSING'}" for path, ok in found.items()]


def main_line_section(main: Optional[dict], data: Optional[dict]) -> list[str]:
    lines = ["## The main line beside the paper's Table 3 (MCDM on TalkingFace-Wild)", ""]
    if main is None:
        return lines + ["Missing: the main line's metrics (run `dvc repro evaluate`).", ""]
    base = (main.get("baselines") or {}).get("static_reference", {})
    gt = (main.get("baselines") or {}).get("ground_truth", {})
    auto = (main.get("baselines") or {}).get("autoencoder") or {}
    rows = [[f"{m.label} ({'↑' if m.higher_is_better else '↓'})", fmt(main.get(m.key)), f"`{main.get(m.key + '_backend')}`",
             fmt(base.get(m.key)), fmt(auto.get(m.key)), fmt(gt.get(m.key)), fmt(PAPER_TABLE3.get(m.key))] for m in METRICS]
    rows.append(["identity (↓)", fmt(main.get("identity")), f"`{main.get('identity_backend')}`", fmt(base.get("identity")),
                 fmt(auto.get("identity")), fmt(main.get("identity_gt")), "n/a (not in the paper)"])
    lines.append(md_table(["metric", "ours (main line)", "backend", "static reference", "autoencoder ceiling",
                           "ground truth", "paper"], rows))
    lines += ["", "Autoencoder ceiling: the ground truth encoded and decoded by the frozen VAE, i.e. what a "
              "denoiser that reproduced the ground truth's latents exactly would score (every generated frame is a "
              "VAE decode). Where the model is at this column (within sampling noise) and the column is far from "
              "ground truth, the VAE, not the diffusion model, is the limit."]
    lines += fvd_parts_lines(main, {"static reference": base, "autoencoder ceiling": auto})
    errors = [str(main[m.key + "_error"]) for m in (*METRICS, IDENTITY) if main.get(m.key + "_error")]
    lines += ["", f"Produced by params hash `{main.get('params_hash')}` (variant {main.get('variant')}, alpha "
              f"{fmt(main.get('alpha'))}, {fmt(main.get('steps'))} DDIM steps, {fmt(main.get('n_clips'))} test clips, "
              f"{fmt(main.get('frames'))} frames, {fmt(main.get('seconds_per_frame'))} s per generated frame)."]
    if errors:
        lines.append("Not computed: " + "; ".join(errors) + ".")
    clips = data_clips(data)
    lines += ["", "Caveats. Scale: the paper trains SD-1.5-sized networks on 241.6 h of TalkingFace-Wild at "
              "512 px; here tiny networks are trained on " + (clips or "the embedded sample data (count missing)")
              + ". Backends: the paper measures FID with Inception, FVD with I3D, E-FID with Deep3DFaceRecon and "
              "Sync-C/D with the official SyncNet; a backend label naming anything else is a labelled fallback "
              "whose numbers are on another scale, so only the direction against the baselines is meaningful, "
              "not the magnitude against the paper.", ""]
    checks = main.get("checks") or {}
    if checks:
        lines += ["Checks (decisions.md #20):", ""]
        lines += [f"- {k}: {fmt(v) if v is not None else 'n/a (metric missing)'}" for k, v in checks.items()]
        lines.append("")
    return lines


def fvd_parts_lines(main: dict, others: dict[str, dict]) -> list[str]:
    """The FVD fallback's distance on each part of its features (``fvd_part_*``), ours beside the
    baselines': whether a value comes from how the frames look or how they move."""
    parts = [key for key in main if key.startswith("fvd_part_")]  # in the order metrics.fvd wrote them
    if not parts:
        return []
    rows = [[key.removeprefix("fvd_part_").replace("_", " "), fmt(main.get(key)),
             *[fmt(o.get(key)) for o in others.values()]] for key in parts]
    return ["", "The FVD fallback on each part of its clip features (Fréchet distance of that part alone; "
            "the parts correlate, so they do not add up to the whole): appearance = the face descriptor's mean "
            "and std over the clip, motion = spectra of landmark velocities, mean signals = the clip's mean "
            "pose and expression, frame change = spectrum of the frame-to-frame pixel change (flicker).", "",
            md_table(["FVD part", "ours", *others], rows)]


def data_clips(data: Optional[dict]) -> Optional[str]:
    stages = (data or {}).get("stages") or {}
    if not stages:
        return None
    last = list(stages)[-1]
    s = stages[last]
    seconds = s.get("video_seconds")
    read = f", which read {fmt(seconds)} s of video" if seconds else ""
    return f"{s.get('kept')} clips kept by the last data stage ({last}{read})"


def data_section(data: Optional[dict]) -> list[str]:
    lines = ["## Data", ""]
    if data is None:
        return lines + ["Missing: `data_pipeline.json` (run `dvc repro data_report`).", ""]
    rows = []
    for name, s in (data.get("stages") or {}).items():
        reasons = ", ".join(f"{k} {v}" for k, v in (s.get("rejected") or {}).items()) or "none"
        rows.append([name, fmt(s.get("kept")), fmt(s.get("rejected_total")), reasons, fmt(s.get("seconds"))])
    lines.append(md_table(["stage", "kept", "rejected", "reasons", "seconds"], rows))
    scores = data.get("scores")
    if isinstance(scores, dict) and scores:
        lines += ["", "Filters against the planted defects:", ""]
        for key, value in scores.items():
            text = ", ".join(f"{k} {fmt(v)}" for k, v in value.items()) if isinstance(value, dict) else fmt(value)
            lines.append(f"- {key}: {text}")
    return lines + [""]


def train_section(train: dict[str, Optional[dict]]) -> list[str]:
    lines = ["## Training (main line)", ""]
    rows = []
    for path, t in train.items():
        if t is None:
            rows.append([Path(path).stem, "MISSING", "", "", "", ""])
            continue
        rows.append([f"stage {t.get('stage')} ({t.get('variant')})", fmt(t.get("steps")),
                     f"{fmt(t.get('loss_first10'))} → {fmt(t.get('loss_last10'))}",
                     f"{fmt(t.get('fixed_batch_loss_start'))} → {fmt(t.get('fixed_batch_loss_end'))}",
                     fmt(t.get("wall_s")), fmt(t.get("samples_per_s"))])
    lines.append(md_table(["stage", "steps", "loss (first → last 10%)", "fixed-batch loss (before → after)",
                           "wall s", "samples/s"], rows))
    return lines + [""]


def long_term_section(main: Optional[dict], rows: list[dict], long_term_png: Optional[str], variants_png: Optional[str]) -> list[str]:
    lines = ["## Long-term generation (Figure 5)", ""]
    lt = (main or {}).get("long_term")
    if lt:
        lines.append(f"Main line, {fmt(lt.get('seconds'))} s ({', '.join(lt.get('clips', []))}): SSIM "
                     f"{fmt(lt.get('ssim_first'))} (first 10%) → {fmt(lt.get('ssim_last'))} (last 10%); identity "
                     f"drift {fmt(lt.get('identity_drift'))} (ground truth's {fmt(lt.get('identity_gt_drift'))}).")
    else:
        lines.append("Missing: the main line's long-term summary.")
    if long_term_png:
        lines += ["", f"![long-term curve of the main line]({long_term_png})"]
    drift = {r["variant"]: r.get("long_term_identity_drift_mean") for r in rows}
    if drift:
        lines += ["", "Identity drift per variant (mean over seeds): "
                  + ", ".join(f"{v} {fmt(d)}" for v, d in drift.items()) + "."]
        if drift.get("full") is not None and drift.get("wo_fa") is not None:
            ok = drift["full"] <= drift["wo_fa"]
            lines.append(f"The full model's drift is no larger than wo_fa's (decisions.md #20): {'yes' if ok else 'no'}.")
    if variants_png:
        lines += ["", f"![long-term curves per variant]({variants_png})"]
    return lines + [""]


OPEN_SET_METRICS = (Metric("sync_c", "Sync-C", True), Metric("sync_d", "Sync-D", False), IDENTITY)


def open_set_section(summary: Optional[dict], main: Optional[dict], source: Optional[str], out: Path) -> list[str]:
    """The open-set table (decisions.md #23): per audio language and over all pairs, Sync-C/D, identity
    (beside the portrait clip's own), FID against training frames; then the test split beside it."""
    lines = ["## Open set: unseen portraits x held-out audio", ""]
    if source is None:
        return lines + ["Not given to `mcdm report` (`--open-set`): run the `open_set` stage.", ""]
    if summary is None:
        return lines + [f"Missing: `{source}` (run `dvc repro open_set`).", ""]
    table = summary.get("table")
    groups = [(lang, summary["by_language"][lang]) for lang in summary.get("languages", [])]
    groups.append(("all languages", summary.get("overall") or {}))
    rows = [[name, f"{fmt(g.get('n_pairs'))} ({fmt(g.get('cross_language_pairs'))} cross-language)",
             *[f"{fmt(g.get(m.key))} (n {fmt(g.get(m.key + '_n'))})" for m in OPEN_SET_METRICS],
             fmt(g.get("identity_gt")), fmt(g.get("fid"))] for name, g in groups]
    lines += [f"Each portrait is frame 0 of a clip of an identity held out of training and test, speaking a held-out "
              f"audio clip of another language where one exists; {fmt(summary.get('n_pairs'))} of "
              f"{fmt(summary.get('pairs_available'))} pairs, {fmt(summary.get('clip_seconds'))} s each at most. Means "
              "over the pairs that have the metric (n); FID pools the group's generated frames against "
              f"{fmt((summary.get('fid_real') or {}).get('frames'))} TRAINING frames."
              + (f" Per pair: [{Path(table).name}]({os.path.relpath(table, out)})." if table else ""), ""]
    lines.append(md_table(["audio language", "pairs", "Sync-C (↑)", "Sync-D (↓)", "identity (↓)",
                           "identity of the portrait clip's own frames", "FID vs training frames (↓)"], rows))
    backends = summary.get("backends") or {}
    labels = {"sync_c": "Sync-C", "sync_d": "Sync-D", "identity": "identity", "fid": "FID"}
    lines += ["", "Backends: " + "; ".join(f"{labels.get(k, k)} `{v}`" for k, v in backends.items()) + ". Produced by params hash "
              f"`{summary.get('params_hash')}` (variant {summary.get('variant')}, alpha {fmt(summary.get('alpha'))}, "
              f"{fmt(summary.get('steps'))} DDIM steps; models trained with params hash `{summary.get('model_params_hash')}`)."]
    overall = summary.get("overall") or {}
    errors = sorted({str(overall[k]) for k in overall if k.endswith("_error") and overall[k]})
    if errors:
        lines.append("Not computed: " + "; ".join(errors) + ".")
    lines += ["", open_set_vs_test_line(overall, main), ""]
    return lines


def open_set_vs_test_line(overall: dict, main: Optional[dict]) -> str:
    """The open set's overall means beside the test split's numbers (reports/metrics.json)."""
    if main is None:
        return "Test split: missing (`metrics.json`), no comparison."

    def diff(key):
        a, b = overall.get(key), main.get(key)
        return "n/a" if a is None or b is None else f"{a - b:+.3g}"

    ours = ", ".join(f"{m.label} {fmt(overall.get(m.key))}" for m in OPEN_SET_METRICS)
    test = ", ".join(f"{m.label} {fmt(main.get(m.key))}" for m in OPEN_SET_METRICS)
    deltas = ", ".join(f"{m.label} {diff(m.key)}" for m in OPEN_SET_METRICS)
    return (f"Beside the test split (main line, `metrics.json`, params hash `{main.get('params_hash')}`: seen or unseen "
            f"portraits with their own audio): test {test} (identity of ground truth {fmt(main.get('identity_gt'))}; "
            f"FID {fmt(main.get('fid'))}, against the test clips' own frames, not training frames); open set {ours}; "
            f"open set minus test: {deltas}.")


def token_figures_section(summary: Optional[dict], source: Optional[str], out: Path,
                          found: dict[str, bool]) -> list[str]:
    """Links to the lip-token heatmap and the t-SNE of expression tokens (Figure 6), with what they show."""
    lines = ["## Motion tokens: lip-token heatmap and t-SNE of expression tokens (Figure 6)", ""]
    if source is None:
        return lines + ["Not given to `mcdm report` (`--token-figures`): run the `token_figures` stage.", ""]
    if summary is None:
        return lines + [f"Missing: `{source}` (run `dvc repro token_figures`).", ""]
    lip, tsne = summary.get("lip_heatmap") or {}, summary.get("tsne") or {}
    what = ("the present-clip motion prior's sampled lip tokens beside" if lip.get("sampled")
            else f"not sampled ({lip.get('not_sampled_reason')});")
    lines.append(f"Lip tokens over time of {', '.join(lip.get('clips', []))}: {what} the lip encoder's tokens of the "
                 f"ground-truth mouth crops ({fmt(lip.get('lip_dim'))} dims, {fmt(lip.get('prior_steps'))} prior DDIM "
                 "steps per clip), under the audio's loudness envelope; each heatmap has its own colour bar.")
    lines += ["", _picture(lip.get("path"), "lip-token heatmap", out, found)]
    lines += ["", f"t-SNE of {fmt(tsne.get('points'))} expression tokens ({fmt(tsne.get('expression_dim'))} dims) of "
              f"{fmt(tsne.get('clips'))} test and open-set clips, {fmt(tsne.get('identities'))} identities (perplexity "
              f"{fmt(tsne.get('perplexity'))}, random_state {fmt(tsne.get('random_state'))}); coordinates in "
              f"`{tsne.get('csv')}`. Clusters by colour would mean the tokens carry identity rather than expression."]
    return lines + ["", _picture(tsne.get("path"), "t-SNE of expression tokens", out, found), ""]


def _picture(path: Optional[str], label: str, out: Path, found: dict[str, bool]) -> str:
    """A markdown image link relative to the report, or the line saying the picture is missing."""
    if path and found.get(path):
        return f"![{label}]({os.path.relpath(path, out)})"
    return f"Missing: the {label} picture `{path}`."


def write_report(params: Params, metrics: str | Path, members_dir: str | Path, train: Sequence[str | Path],
                 data: str | Path, out: str | Path, long_term_png: Optional[str | Path] = None,
                 open_set: Optional[str | Path] = None, token_figures: Optional[str | Path] = None) -> dict:
    """Read the inputs, write the OUTPUTS into ``out``; returns a summary (paths, missing inputs).
    ``open_set`` / ``token_figures``: the summaries of those stages (their sections say so when not given)."""
    out = Path(out)
    main = read_json(metrics)
    data_report = read_json(data)
    trains = {str(p): read_json(p) for p in train}
    all_members = load_members(members_dir)
    ablation, sweep, missing_members, ignored = select_members(all_members, params)
    variants = list(params.ablations.variants)
    rows = variant_rows(ablation, variants)

    metric_cols = [f"{m.key}_{s}" for m in (*METRICS, IDENTITY) for s in ("mean", "std", "n", "backend")]
    write_csv(rows, out / "ablations.csv", ["variant", "n_members", "seeds", "retrained_stages", *metric_cols])
    write_text(ablations_markdown(rows, ablation, sweep, params), out / "ablations.md")
    srows = sweep_rows(sweep)
    write_csv(srows, out / "alpha_sweep.csv", ["alpha", "member", "seed", "params_hash", *[m.key for m in METRICS]])
    wo_mta = {m.key: mean_std(x.get(m.key) for x in ablation if x["member"]["variant"] == "wo_mta")[0] for m in METRICS}
    plot_sweep(srows, wo_mta, out / "alpha_sweep.png")
    curves = plot_variant_curves(ablation, variants, out / "long_term_variants.png")
    if curves is None:  # a figure that says so rather than a stale one
        empty_figure("no long-term curve from any ablation member", out / "long_term_variants.png")

    found = {str(metrics): main is not None, str(data): data_report is not None,
             **{p: t is not None for p, t in trains.items()}, f"{members_dir}/*/metrics.json": bool(all_members)}
    if long_term_png is not None:
        found[str(long_term_png)] = Path(long_term_png).is_file()
    open_summary = figures = None
    if open_set is not None:
        open_summary = read_json(open_set)
        found[str(open_set)] = open_summary is not None
    if token_figures is not None:
        figures = read_json(token_figures)
        found[str(token_figures)] = figures is not None
        for part in ("lip_heatmap", "tsne"):
            picture = ((figures or {}).get(part) or {}).get("path")
            if picture:
                found[str(picture)] = Path(picture).is_file()
    rel = (lambda p: os.path.relpath(p, out))
    lines = ["# MCDM at the embedded scale: report", "",
             "Written by `mcdm report` from the pipeline's files; every number below is read from them, with "
             "the backend that measured it and the params hash that produced it. Missing inputs are listed, "
             "not filled in.", "", "## Inputs", "", *_inputs_table(found)]
    lines += [f"- missing {m}" for m in missing_members] + [f"- ignored (not in the current matrix): `{p}`" for p in ignored]
    lines.append("")
    lines += main_line_section(main, data_report)
    lines += ["## Ablations and variants (Tables 4-5)", "", f"Full tables: [ablations.md](ablations.md), "
              "[ablations.csv](ablations.csv). Members are evaluated with "
              f"`{json.dumps(params.ablations.eval)}` over the main line's eval settings (`ablations.eval`), so their "
              "numbers compare with each other, not with the main line's.", ""]
    if rows:
        table = [[r["variant"], *[f"{fmt_mean_std(r[f'{m.key}_mean'], r[f'{m.key}_std'])} / {fmt(r.get(f'paper_{m.key}'))}"
                                  for m in METRICS]] for r in rows]
        lines += [md_table(["variant (ours / paper)", *[m.label for m in METRICS]], table), ""]
        lines += [ordering_line(rows, m) for m in METRICS] + [""]
    else:
        lines += ["Missing: no ablation member (run `dvc repro ablation`).", ""]
    lines += ["## Alpha sweep (Figure 7)", ""]
    if srows:
        lines += [md_table(["alpha", *[m.label for m in METRICS], "params hash"],
                           [[fmt(r["alpha"]), *[fmt(r[m.key]) for m in METRICS], f"`{r['params_hash']}`"] for r in srows])]
        lines += ["", f"wo_mta level (mean of the wo_mta members): SSIM {fmt(wo_mta.get('ssim'))}.", ""]
        lines += sweep_claims(srows, wo_mta.get("ssim"))
        lines += ["", f"![alpha sweep]({rel(out / 'alpha_sweep.png')})", ""]
    else:
        lines += ["Missing: no sweep member (run `dvc repro sweep`).", ""]
    lines += long_term_section(main, rows, rel(long_term_png) if found.get(str(long_term_png)) else None,
                               rel(curves) if curves else None)
    lines += open_set_section(open_summary, main, None if open_set is None else str(open_set), out)
    lines += token_figures_section(figures, None if token_figures is None else str(token_figures), out, found)
    lines += data_section(data_report)
    lines += train_section(trains)
    write_text("\n".join(lines) + "\n", out / "report.md")
    return {"outputs": [str(out / name) for name in OUTPUTS], "missing": [k for k, ok in found.items() if not ok]
            + missing_members, "members": len(ablation) + len(sweep), "ignored": ignored}
