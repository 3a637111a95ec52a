"""The report (decisions.md #23): the main line with its baselines and sample sizes, the paper's own
numbers in their own table, the claims' verdicts, the ablation and variant tables, the alpha sweep,
the long-term curves, SyncNet's folds, the open set, the token figures, the data and training numbers.

Every number comes from a file the pipeline wrote (``reports/metrics_details.json``, the matrix
members' ``metrics_details.json``, ``reports/claims.json``, ``models/syncnet/metrics.json``,
``reports/train_stage*.json``, ``reports/data_pipeline.json``, the open-set summary
``reports/open_set.json`` and the token figures' ``reports/token_figures.json``) and is printed with
its backend label and the params hash that produced it; an input that is not there is listed as
missing, never filled in. The paper's numbers (its Tables 3-5, TalkingFace-Wild) never share a cell
or a table with ours: our fallback metrics measure other features at another scale, so orderings
compare (``claims.md``), values do not.

Maths: every interval and verdict is the claims stage's (``mcdm.eval.claims``); the open set's
"open set minus test" differences subtract the test split's pooled value from the open set's mean over
all pairs, per metric, where both exist.

Outputs (in ``out``): ``ablations.csv`` (a row per variant), ``ablations.md``, ``alpha_sweep.csv`` (a
row per alpha) and ``report.md``; the pictures it links are the claims stage's and evaluate's.
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
    PAPER_ORDER,
    Metric,
    ablations_markdown,
    fmt,
    fmt_ci,
    load_members,
    md_table,
    paper_table,
    read_json,
    select_members,
    sweep_rows,
    variant_rows,
)
from mcdm.eval.claims_report import verdict_counts
from mcdm.eval.metric_files import read_details
from mcdm.eval.quality_report import quality_section
from mcdm.media.files import write_csv, write_text

OUTPUTS = ("ablations.csv", "ablations.md", "alpha_sweep.csv", "report.md")
BASELINE_COLUMNS = {"static_reference": "static reference", "autoencoder": "autoencoder ceiling",
                    "ground_truth": "ground truth", "reversed_ground_truth": "ground truth played backwards"}
# what each metric's n counts (metrics.json's <metric>_n)
N_UNITS = {"fid": "frames", "fvd": "clips", "sync_c": "SyncNet windows", "sync_d": "SyncNet windows",
           "ssim": "frames", "efid": "frames", "identity": "frames"}


def _inputs_table(found: dict[str, Optional[str]]) -> list[str]:
    return [f"- `{path}`: {'read' if ok else 'MISSING'}" for path, ok in found.items()]


def _rate(m: dict, key: str) -> str:
    value = m.get(f"{key}_failure_rate")
    if value is None:
        return "" if key in ("ssim", "sync_c", "sync_d") else "n/a"
    return f"{fmt(value, 3)} [{fmt(m.get(f'{key}_failure_rate_low'), 2)}, {fmt(m.get(f'{key}_failure_rate_high'), 2)}]"


def main_line_section(main: Optional[dict], data: Optional[dict]) -> list[str]:
    lines = ["## The main line (the setting of the paper's Table 3)", ""]
    if main is None:
        return lines + ["Missing: the main line's metrics (run `dvc repro evaluate`).", ""]
    base = main.get("baselines") or {}
    rows = [[f"{m.label} ({'↑' if m.higher_is_better else '↓'})", fmt(main.get(m.key)),
             f"{fmt(main.get(m.key + '_n'))} {N_UNITS[m.key]}", _rate(main, m.key), f"`{main.get(m.key + '_backend')}`",
             *[fmt((base.get(b) or {}).get(m.key)) for b in BASELINE_COLUMNS]] for m in (*METRICS, IDENTITY)]
    lines.append(md_table(["metric", "ours (main line)", "n", "generated frames (clips) without a face: rate [95% CI]",
                           "backend", *BASELINE_COLUMNS.values()], rows))
    lines += ["", f"{fmt(main.get('n_clips'))} test clips, {fmt(main.get('frames'))} generated frames "
              f"({', '.join(main.get('clips') or [])}). A generated frame without a face is charged, not dropped "
              "(identity: distance 1.0; FID, E-FID, FVD: the no-face point outside every real feature, "
              "`src/mcdm/eval/failures.py`), and its rate is given beside the metric. Autoencoder ceiling: the ground "
              "truth encoded and decoded by the frozen VAE (every generated frame is a VAE decode). Ground truth "
              "played backwards: real faces, wrong direction of time: the metrics that see temporal order (FVD, "
              "Sync-C / Sync-D) score it worse than ground truth."]
    lines += fvd_parts_lines(main, {BASELINE_COLUMNS[b]: base.get(b) or {} for b in ("static_reference", "autoencoder",
                                                                                       "reversed_ground_truth")})
    errors = [str(main[m.key + "_error"]) for m in (*METRICS, IDENTITY) if main.get(m.key + "_error")]
    lines += ["", f"Produced by params hash `{main.get('params_hash')}` (variant {main.get('variant')}, alpha "
              f"{fmt(main.get('alpha'))}, seed {fmt(main.get('seed'))}, {fmt(main.get('steps'))} DDIM steps, "
              f"{fmt(main.get('seconds_per_frame'))} s per generated frame)."]
    if errors:
        lines.append("Not computed: " + "; ".join(errors) + ".")
    clips = data_clips(data)
    lines += ["", "Scale: the paper trains SD-1.5-sized networks on 241.6 h of TalkingFace-Wild at 512 px; here tiny "
              "networks are trained on " + (clips or "the embedded sample data (count missing)") + ". Backends: the "
              "paper measures FID with Inception, FVD with I3D, E-FID with Deep3DFaceRecon and Sync-C/D with the "
              "official SyncNet; a backend label naming anything else is a labelled fallback on another scale. "
              "The paper's numbers are therefore in their own table below, never beside ours.", ""]
    return lines


def paper_section(claims: Optional[dict]) -> list[str]:
    """The paper's Tables 3-5 alone, then its orderings against our verdicts (claims.json)."""
    lines = ["## The paper's numbers (Tables 3-5, TalkingFace-Wild), and its orderings against ours", "",
             *paper_table(), ""]
    groups = {g["id"]: g for g in (claims or {}).get("groups", [])}
    rows = [[f"{' > '.join(PAPER_ORDER)} on {m.label}", "holds", (groups.get(f"T4.order.{m.key}") or {}).get("verdict", "n/a")]
            for m in METRICS]
    lines += [md_table(["ordering (Table 4)", "in the paper", "ours (claims.md)"], rows), ""]
    return lines


def evidence_section(claims: Optional[dict], effects_png: Optional[str]) -> list[str]:
    """The claims' verdicts at a glance (the rows are in claims.md)."""
    lines = ["## The paper's claims at our precision", ""]
    if claims is None:
        return lines + ["Missing: `claims.json` (run `dvc repro claims`).", ""]
    counts = verdict_counts(claims)
    lines += [f"[claims.md](claims.md) answers {len(claims['claims'])} claims of Tables 3-5 and Figures 5 and 7 with our "
              f"effect, its {claims.get('level', 0.95):.0%} interval, the clips x seeds and frames it rests on, and a "
              f"verdict: {counts['supported']} supported, {counts['refuted']} refuted, {counts['inconclusive']} "
              "inconclusive at the measured precision.", ""]
    rows = [[g["claim"], f"**{g['verdict']}**"] for g in claims.get("groups", [])]
    rows += [[r["text"], f"**{r['verdict']}** ({fmt(r['effect'], 3)} [{fmt(r['low'], 3)}, {fmt(r['high'], 3)}], "
              f"n {r['n_units']})"] for r in claims["claims"] if r["source"] in ("Table 3", "Figure 5")
             or r["kind"] == "trend"]
    lines += [md_table(["claim", "verdict (effect [95% CI], units)"], rows), ""]
    if effects_png:
        lines += [f"![paired effects with their intervals]({effects_png})", ""]
    return lines


def syncnet_section(syncnet: Optional[dict], source: Optional[str]) -> list[str]:
    """SyncNet's two folds: what the metric SyncNet trained on, planted out-of-sync clips among them."""
    lines = ["## SyncNet: trained apart from the test clips (decisions.md #22)", ""]
    if source is None:
        return lines + ["Not given to `mcdm report` (`--syncnet`).", ""]
    if syncnet is None:
        return lines + [f"Missing: `{source}` (run `dvc repro syncnet_train`).", ""]
    folds = syncnet.get("folds") or {}
    metric, cross = folds.get("metric") or {}, folds.get("cross_fit") or {}
    other = syncnet.get("cross_fit") or {}
    lines += [f"The SyncNet that measures Sync-C / Sync-D trained on {fmt(syncnet.get('train_clips'))} clips of the "
              f"training split ({fmt(syncnet.get('heldout_clips'))} more of it held out for its accuracy; "
              f"{fmt(metric.get('groups'))} identity groups in all): its training-clip table (`models/syncnet/training_clips.csv`) shares "
              "no clip with the test and open-set tables, and no identity with the regular test clips and the open "
              "set (a long-term test clip's identity can be a training identity, as it is for the generator). "
              f"{fmt(syncnet.get('planted_out_of_sync_in_train'))} planted out-of-sync clips (of "
              f"{fmt(syncnet.get('planted_out_of_sync_in_table'))} in the face-filtered table) were among its training "
              f"clips. The sync filter scores every clip with a SyncNet that never saw it: the clips of that fold with "
              f"the one trained on the other {fmt(cross.get('clips'))} clips ({fmt(cross.get('groups'))} groups; "
              f"{fmt(other.get('planted_out_of_sync_in_train'))} planted out-of-sync clips in its training data), the "
              "others with the metric SyncNet.", "",
              f"Held out: pair AUC {fmt(syncnet.get('heldout_pair_auc'), 3)}, offset found (|o| <= 1) "
              f"{fmt(syncnet.get('heldout_offset_within_1'), 3)} (metric SyncNet); pair AUC "
              f"{fmt(other.get('heldout_pair_auc'), 3)} (the other fold's).", ""]
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
            "pose and expression, frame change = spectrum of the frame-to-frame pixel change (flicker), time order = "
            "the velocities' asymmetry and lead-lag, which change sign when the clip plays backwards.", "",
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


def long_term_section(main: Optional[dict], rows: list[dict], long_term_png: Optional[str],
                      variants_png: Optional[str]) -> list[str]:
    lines = ["## Long-term generation (Figure 5)", ""]
    lt = (main or {}).get("long_term")
    if lt:
        lines.append(f"Main line, {fmt(lt.get('seconds'))} s ({', '.join(lt.get('clips', []))}): SSIM "
                     f"{fmt(lt.get('ssim_first'))} (first 10%) → {fmt(lt.get('ssim_last'))} (last 10%); identity "
                     f"drift {fmt(lt.get('identity_drift'))} (ground truth's {fmt(lt.get('identity_gt_drift'))}); per "
                     f"{fmt(lt.get('window_seconds'))} s window: SSIM decay {fmt(lt.get('window_ssim_decay'))}, identity "
                     f"drift {fmt(lt.get('window_identity_drift'))}, generated frames without a face "
                     f"{fmt(lt.get('identity_failure_rate'))}.")
    else:
        lines.append("Missing: the main line's long-term summary.")
    if long_term_png:
        lines += ["", f"![long-term curve of the main line]({long_term_png})"]
    if rows:
        lines += ["", "Every ablation member is measured on the long-term clips too (`ablations.eval`), per window; per "
                  "variant, the mean over long-term clips x seeds with its interval (verdicts: `claims.md`, Figure 5):", "",
                  md_table(["variant", "SSIM decay (first - last window, ↓)", "identity drift (last - first, ↓)"],
                           [[r["variant"], fmt_ci(r, "ssim_decay"), fmt_ci(r, "identity_drift")] for r in rows])]
    if variants_png:
        lines += ["", f"![long-term windows per variant]({variants_png})"]
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
             fmt(g.get("identity_failure_rate"), 3), fmt(g.get("identity_gt")), fmt(g.get("fid"))] for name, g in groups]
    lines += [f"Each portrait is frame 0 of a clip of an identity held out of training and test, speaking a held-out "
              f"audio clip of another language where one exists; {fmt(summary.get('n_pairs'))} of "
              f"{fmt(summary.get('pairs_available'))} pairs, {fmt(summary.get('clip_seconds'))} s each at most. Means "
              "over the pairs that have the metric (n); FID pools the group's generated frames against "
              f"{fmt((summary.get('fid_real') or {}).get('frames'))} TRAINING frames."
              + (f" Per pair: [{Path(table).name}]({os.path.relpath(table, out)})." if table else ""), ""]
    lines.append(md_table(["audio language", "pairs", "Sync-C (↑)", "Sync-D (↓)", "identity (↓; a lost face 1.0)",
                           "generated frames without a face", "identity of the portrait clip's own frames",
                           "FID vs training frames (↓)"], rows))
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
                 open_set: Optional[str | Path] = None, token_figures: Optional[str | Path] = None,
                 claims: Optional[str | Path] = None, syncnet: Optional[str | Path] = None) -> dict:
    """Read the inputs, write the OUTPUTS into ``out``; returns a summary (paths, missing inputs).
    ``metrics``: the main line's ``metrics_details.json`` (or its ``metrics.json``, beside which it lies);
    ``open_set`` / ``token_figures`` / ``claims`` / ``syncnet``: those stages' summaries (their sections
    say so when not given)."""
    out = Path(out)
    main = read_details(metrics)
    data_report = read_json(data)
    trains = {str(p): read_json(p) for p in train}
    all_members = load_members(members_dir)
    ablation, sweep, missing_members, ignored = select_members(all_members, params)
    variants = list(params.ablations.variants)
    found = {str(metrics): main is not None, str(data): data_report is not None,
             **{p: t is not None for p, t in trains.items()}, f"{members_dir}/*/metrics_details.json": bool(all_members)}
    optional = {}
    for key, path in (("long_term", long_term_png), ("open_set", open_set), ("token_figures", token_figures),
                      ("claims", claims), ("syncnet", syncnet)):
        if path is not None:
            optional[key] = None if key == "long_term" else read_json(path)
            found[str(path)] = Path(path).is_file() if key == "long_term" else optional[key] is not None
    claims_json = optional.get("claims")
    rows = variant_rows(claims_json, ablation, variants)
    metric_cols = [f"{m.key}_{s}" for m in (*METRICS, IDENTITY) for s in ("mean", "low", "high", "n", "backend")]
    write_csv(rows, out / "ablations.csv", ["variant", "n_members", "seeds", "retrained_stages", *metric_cols])
    write_text(ablations_markdown(rows, ablation, params, claims_json), out / "ablations.md")
    srows = sweep_rows(claims_json, sweep)
    write_csv(srows, out / "alpha_sweep.csv", ["alpha", "member", "seed", "params_hash",
                                               *[f"{m.key}_{s}" for m in METRICS for s in ("mean", "low", "high")]])
    for part in ("lip_heatmap", "tsne"):
        picture = (((optional.get("token_figures") or {}).get(part)) or {}).get("path")
        if picture:
            found[str(picture)] = Path(picture).is_file()
    pictures = {name: f"{name}.png" if (out / f"{name}.png").is_file() else None
                for name in ("claims_effects", "alpha_sweep", "long_term_variants")}
    rel = (lambda p: os.path.relpath(p, out))
    lines = ["# MCDM at the embedded scale: report", "",
             "Written by `mcdm report` from the pipeline's files; every number below is read from them, with "
             "the backend that measured it, the clips and frames it rests on and the params hash that produced it. "
             "Missing inputs are listed, not filled in.", "", "## Inputs", "", *_inputs_table(found)]
    lines += [f"- missing {m}" for m in missing_members] + [f"- ignored (not in the current matrix): `{p}`" for p in ignored]
    lines.append("")
    lines += evidence_section(claims_json, pictures["claims_effects"])
    lines += main_line_section(main, data_report)
    lines += quality_section(main)
    lines += paper_section(claims_json)
    lines += ["## Ablations and variants (Tables 4-5)", "", f"Full tables: [ablations.md](ablations.md), "
              "[ablations.csv](ablations.csv); every comparison with its interval and verdict: [claims.md](claims.md). "
              f"Members are evaluated with `{json.dumps(params.ablations.eval)}` over the main line's eval settings "
              "(`ablations.eval`), so their numbers compare with each other, not with the main line's. Per-clip "
              "metrics: mean over (clip, seed) units [95% CI]; FID, FVD, E-FID: pooled over the units.", ""]
    if rows:
        lines += [md_table(["variant", "seeds", "units", *[m.label for m in (*METRICS, IDENTITY)]],
                           [[r["variant"], r["seeds"], fmt(r.get("units")), *[fmt_ci(r, m.key) for m in (*METRICS, IDENTITY)]]
                            for r in rows]), ""]
    else:
        lines += ["Missing: no ablation member (run `dvc repro ablation`).", ""]
    lines += ["## Alpha sweep (Figure 7)", ""]
    if srows:
        lines += [md_table(["alpha", *[m.label for m in METRICS], "params hash"],
                           [[fmt(r["alpha"]), *[fmt_ci(r, m.key) for m in METRICS], f"`{r['params_hash']}`"] for r in srows])]
        if pictures["alpha_sweep"]:
            lines += ["", f"![alpha sweep with intervals]({pictures['alpha_sweep']})"]
        lines += ["", "Verdicts on Figure 7's claims (SSIM declines as alpha grows; MTA beats wo_mta below 0.9 and not at "
                  "0.9), on the test clips and on the last long-term window: `claims.md`.", ""]
    else:
        lines += ["Missing: no sweep member (run `dvc repro sweep`).", ""]
    lines += long_term_section(main, rows, rel(long_term_png) if found.get(str(long_term_png)) else None,
                               pictures["long_term_variants"])
    lines += syncnet_section(optional.get("syncnet"), None if syncnet is None else str(syncnet))
    lines += open_set_section(optional.get("open_set"), main, None if open_set is None else str(open_set), out)
    lines += token_figures_section(optional.get("token_figures"), None if token_figures is None else str(token_figures),
                                   out, found)
    lines += data_section(data_report)
    lines += train_section(trains)
    write_text("\n".join(lines) + "\n", out / "report.md")
    return {"outputs": [str(out / name) for name in OUTPUTS], "missing": [k for k, ok in found.items() if not ok]
            + missing_members, "members": len(ablation) + len(sweep), "ignored": ignored}
