"""README's measured numbers, generated from the files the pipeline and the benchmark scripts write
(never typed by hand).

    python tools/readme_numbers.py            # check: exit 1 when a README block differs from its files
    python tools/readme_numbers.py --write    # rewrite README's blocks from the committed files
    python tools/readme_numbers.py --snapshot reports --label "make run of <commit> on <machine>"
                                              # after a `make run`: docs/results/run.json from its
                                              # reports/, then rewrite the blocks

The block between ``BEGIN`` and ``END`` holds streaming (benchmarks/bench_streaming.py), long-term
generation at constant memory (benchmarks/bench_generation.py) and per-stage training throughput
(benchmarks/bench_train_stages.py). tests/test_readme_numbers.py checks that it matches the
committed ``reports/benchmarks.json``.

The quality block is issue #20's targets table of whole main lines: the ``end_to_end`` rows that
``benchmarks/quality_attempts.py`` writes to ``reports/quality_attempts.json`` from the attempt files
its ``--record-run`` took of finished runs.

The evaluation's files (``reports/metrics.json`` and the rest) are DVC outputs that a checkout does
not have, so the results block is rendered from ``docs/results/run.json``: a small snapshot that
``--snapshot`` takes of one run's ``reports/`` (headline metrics, the baselines, the long-term summary,
the claims' verdicts, the training stages' wall times), labelled with the run it came from.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- numbers:begin (tools/readme_numbers.py --write, from reports/benchmarks.json) -->"
END = "<!-- numbers:end -->"
RESULTS_BEGIN = "<!-- results:begin (tools/readme_numbers.py --write, from docs/results/run.json) -->"
RESULTS_END = "<!-- results:end -->"
RESULTS = ROOT / "docs" / "results" / "run.json"
QUALITY_BEGIN = "<!-- quality:begin (tools/readme_numbers.py --write, from reports/quality_attempts.json) -->"
QUALITY_END = "<!-- quality:end -->"
QUALITY = ROOT / "reports" / "quality_attempts.json"
QUALITY_COLUMNS = (("attempt", "run"), ("change", "what ran"), ("main_line_min", "main line (min)"),
                   ("resolution", "resolution"), ("autoencoder_identity_gap", "autoencoder identity gap"),
                   ("identity_gap", "identity gap"), ("no_face_frames", "no-face frames"),
                   ("sync_c_fraction", "Sync-C fraction"), ("mouth_open_corr", "mouth-opening corr. [95% CI]"),
                   ("sharpness_ratio", "sharpness ratio"), ("psnr_db", "PSNR (dB)"), ("targets_met", "targets met"))
HEADLINE = ("fvd", "fid", "efid", "sync_c", "sync_d", "ssim", "identity")
LABELS = {"fvd": "FVD ↓", "fid": "FID ↓", "efid": "E-FID ↓", "sync_c": "Sync-C ↑", "sync_d": "Sync-D ↓",
          "ssim": "SSIM ↑", "identity": "identity distance ↓"}
BASELINES = ("static_reference", "autoencoder", "ground_truth")


def _streaming(section: dict) -> list[str]:
    runs = sorted(((v["seconds"], v) for k, v in section.items() if k.endswith("s") and isinstance(v, dict)),
                  key=lambda kv: kv[0])
    if not runs:
        return []
    lines = ["Streaming (`benchmarks/bench_streaming.py`: `--stream`'s path, tiny untrained model, "
             f"{runs[0][1]['steps']} steps, {runs[0][1]['size']} portrait, full frame, "
             f"{runs[0][1]['threads']} thread):", "",
             "| speech | time to first frame | real-time factor (wall) | real-time factor (CPU time) | peak RSS |",
             "|---|---|---|---|---|"]
    for seconds, run in runs:
        length = f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
        lines.append(f"| {length} | {run['first_frame_seconds']:.2f} s | {run['real_time_factor']:.2f} | "
                     f"{run['cpu_real_time_factor']:.2f} | {run['peak_rss_mb']:.0f} MB |")
    return lines + [""]


def _constant_memory(section: dict) -> list[str]:
    runs = section.get("constant_memory", {}).get("runs", {})
    if not runs:
        return []
    cells = "; ".join(f"{k}: peak RSS {v['peak_rss_mb']:.0f} MB, {v['cpu_seconds_per_frame']:.3f} CPU s per frame"
                      for k, v in sorted(runs.items(), key=lambda kv: kv[1]["seconds"]))
    return [f"Long-term generation at constant memory (`benchmarks/bench_generation.py`, {len(runs)} lengths): "
            f"{cells}.", ""]


def _train_stages(section: dict) -> list[str]:
    cpu = section.get("cpu", {})
    stages = [(k, v) for k, v in sorted(cpu.items()) if k.startswith("stage") and isinstance(v, dict)]
    if not stages:
        return []
    cells = "; ".join(f"{k}: {v['samples_per_s']:.1f} samples/s, peak RSS {v['peak_rss_mb']:.0f} MB"
                      for k, v in stages)
    return [f"Training throughput on the CPU (`benchmarks/bench_train_stages.py`): {cells}.", ""]


def render(benchmarks: Path = ROOT / "reports" / "benchmarks.json") -> str:
    """The README block, from ``benchmarks``."""
    data = json.loads(Path(benchmarks).read_text())
    lines = [*_streaming(data.get("streaming", {})), *_constant_memory(data.get("generation", {})),
             *_train_stages(data.get("train_stages", {}))]
    return "\n".join([BEGIN, *lines, END])


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def snapshot(reports: Path, label: str) -> dict:
    """The compact record of one run that the results block is drawn from, taken from its ``reports/``."""
    reports = Path(reports)
    details = _read(reports / "metrics_details.json")
    if not details:
        raise SystemExit(f"{reports}: no metrics_details.json (run `dvc repro` first)")
    headline = _read(reports / "metrics.json")
    claims = _read(reports / "claims.json")
    verdicts: dict[str, int] = {}
    for claim in claims.get("claims", []):
        verdicts[claim["verdict"]] = verdicts.get(claim["verdict"], 0) + 1
    stages = {f"train_stage{k}": _read(reports / f"train_stage{k}.json").get("wall_s") for k in (1, 2, 3)}
    return {
        "label": label,
        "model": {k: headline.get(k, details.get(k)) for k in (*HEADLINE, "failure_rate", "seconds_per_frame")},
        "backends": {k: details.get(f"{k}_backend") for k in HEADLINE},
        "baselines": {name: {k: base.get(k) for k in HEADLINE}
                      for name, base in details.get("baselines", {}).items() if name in BASELINES},
        "identity_gt": details.get("identity_gt"),
        "n_clips": details.get("n_clips"), "frames": details.get("frames"), "seed": details.get("seed"),
        "steps": details.get("steps"),
        "long_term": {k: details.get("long_term", {}).get(k)
                      for k in ("seconds", "ssim_first", "ssim_last", "identity_drift", "identity_gt_drift")},
        "claims": {"verdicts": verdicts, "seeds": claims.get("seeds")},
        "stage_wall_s": stages,
    }


def _cell(value) -> str:
    if value is None:
        return "–"
    return "0" if abs(value) < 1e-9 else f"{value:.3g}"


def render_results(run_file: Path = RESULTS) -> str:
    """The README results block, from the snapshot ``run_file``."""
    run = _read(Path(run_file))
    if not run:
        return "\n".join([RESULTS_BEGIN, f"(no {Path(run_file).name} yet: run `make run`, then --snapshot)",
                          RESULTS_END])
    model, bases = run["model"], run["baselines"]
    lines = [f"From `docs/results/run.json`, a snapshot of {run['label']}: {run['n_clips']} test clips, "
             f"{run['frames']} generated frames, seed {run['seed']}, {run['steps']} sampling steps. "
             "Fallback backends (not the paper's networks; only directions compare with the paper): "
             + ", ".join(f"{LABELS[k].split(' ')[0]} `{b}`" for k, b in run["backends"].items() if b) + ".", "",
             "| metric | model | " + " | ".join(b.replace("_", " ") for b in BASELINES) + " |",
             "|---|---|" + "---|" * len(BASELINES)]
    for key in HEADLINE:
        lines.append(f"| {LABELS[key]} | {_cell(model.get(key))} | "
                     + " | ".join(_cell(bases.get(b, {}).get(key)) for b in BASELINES) + " |")
    lines.append("")
    failed = model.get("failure_rate")
    lines.append(f"Generated frames without a face: {'–' if failed is None else f'{100 * failed:.1f} %'} of those the "
                 "face metrics read (charged to the model in FID, E-FID, identity and FVD); "
                 f"{_cell(model.get('seconds_per_frame'))} s per generated frame.")
    lt = run.get("long_term") or {}
    if lt.get("seconds"):
        lines.append(f"Long-term clip ({lt['seconds']:g} s): SSIM {_cell(lt['ssim_first'])} in the first window, "
                     f"{_cell(lt['ssim_last'])} in the last; identity drift {_cell(lt['identity_drift'])} "
                     f"(ground truth's own {_cell(lt['identity_gt_drift'])}).")
    verdicts = run["claims"]["verdicts"]
    if verdicts:
        lines.append(f"The paper's claims (`reports/claims.md`, ablation members at seeds {run['claims']['seeds']}): "
                     f"{sum(verdicts.values())} answered: "
                     + ", ".join(f"{verdicts.get(v, 0)} {v}" for v in ("supported", "refuted", "inconclusive")) + ".")
    walls = {k: v for k, v in run["stage_wall_s"].items() if v is not None}
    if walls:
        lines.append("Training stages' wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + ".")
    return "\n".join([RESULTS_BEGIN, *lines, RESULTS_END])


def render_quality(attempts_file: Path = QUALITY) -> str:
    """Issue #20's targets on whole main lines: the ``end_to_end`` rows of benchmarks/quality_attempts.py."""
    rows = json.loads(Path(attempts_file).read_text()).get("end_to_end", [])
    if not rows:
        return "\n".join([QUALITY_BEGIN, "(no end-to-end run recorded: benchmarks/quality_attempts.py --record-run)",
                          QUALITY_END])
    lines = ["| " + " | ".join(label for _, label in QUALITY_COLUMNS) + " | cores |",
             "|" + "---|" * (len(QUALITY_COLUMNS) + 1)]
    for row in rows:
        cells = ["n/a" if row.get(key) is None else str(row[key]) for key, _ in QUALITY_COLUMNS]
        lines.append("| " + " | ".join(cells) + f" | {row['machine']} |")
    lines += ["", "Wall minutes per group of stages, same runs:", "", "| run | minutes |", "|---|---|"]
    lines += [f"| {row['attempt']} | {row.get('minutes_per_stage') or 'n/a'} |" for row in rows]
    return "\n".join([QUALITY_BEGIN, *lines, QUALITY_END])


def readme_block(readme: Path = ROOT / "README.md", begin: str = BEGIN, end: str = END) -> str | None:
    m = re.search(re.escape(begin) + r".*?" + re.escape(end), readme.read_text(encoding="utf-8"), re.S)
    return m.group(0) if m else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite README's blocks")
    parser.add_argument("--snapshot", type=Path, help="a run's reports/ folder: write docs/results/run.json from it")
    parser.add_argument("--label", help="with --snapshot: which run it was (commit, machine, date)")
    args = parser.parse_args(argv)
    if args.snapshot:
        if not args.label:
            parser.error("--snapshot needs --label (which run: commit, machine, date)")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(snapshot(args.snapshot, args.label), indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
        args.write = True
    readme = ROOT / "README.md"
    blocks = [(readme_block(readme), render(), "numbers", "reports/benchmarks.json"),
              (readme_block(readme, RESULTS_BEGIN, RESULTS_END), render_results(), "results", "docs/results/run.json"),
              (readme_block(readme, QUALITY_BEGIN, QUALITY_END), render_quality(), "quality",
               "reports/quality_attempts.json")]
    text, stale = readme.read_text(encoding="utf-8"), []
    for current, wanted, name, source in blocks:
        if current is None:
            print(f"README.md has no {name} block", file=sys.stderr)
            return 1
        text = text.replace(current, wanted)
        if current != wanted:
            stale.append(f"README.md's {name} block differs from {source}")
    if args.write:
        readme.write_text(text, encoding="utf-8")
        print("wrote README.md's numbers, results and quality blocks")
        return 0
    for line in stale:
        print(f"{line}: run tools/readme_numbers.py --write", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
