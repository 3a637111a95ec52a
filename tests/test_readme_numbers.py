"""README's measured numbers come from the files the pipeline and the benchmarks write (issue #21
point 9): the numbers block is what tools/readme_numbers.py renders from the committed
reports/benchmarks.json, the results block what it renders from docs/results/run.json (a snapshot
of one run's reports/), and a changed figure in either file changes its block."""
from __future__ import annotations

import importlib.util
import json
import sys

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "tools" / "readme_numbers.py")
numbers = importlib.util.module_from_spec(_spec)
sys.modules["readme_numbers"] = numbers
_spec.loader.exec_module(numbers)


def test_readme_numbers_block_is_rendered_from_reports_benchmarks_json():
    block = numbers.readme_block()
    assert block is not None, "README.md has no numbers block"
    assert block == numbers.render(), "README.md's numbers differ from reports/benchmarks.json: " \
                                      "run python tools/readme_numbers.py --write"
    streaming = json.loads((ROOT / "reports" / "benchmarks.json").read_text())["streaming"]
    assert f"| 10 s | {streaming['10s']['first_frame_seconds']:.2f} s |" in block


def test_a_changed_benchmark_figure_changes_the_block(tmp_path):
    data = json.loads((ROOT / "reports" / "benchmarks.json").read_text())
    data["streaming"]["10s"]["first_frame_seconds"] = 12.345
    data["generation"]["constant_memory"]["runs"]["10s"]["peak_rss_mb"] = 4321.0
    (tmp_path / "benchmarks.json").write_text(json.dumps(data))
    block = numbers.render(tmp_path / "benchmarks.json")
    assert "| 10 s | 12.35 s |" in block and "peak RSS 4321 MB" in block
    assert block != numbers.readme_block()


def test_readme_results_block_is_rendered_from_the_run_snapshot():
    block = numbers.readme_block(begin=numbers.RESULTS_BEGIN, end=numbers.RESULTS_END)
    assert block is not None, "README.md has no results block"
    assert block == numbers.render_results(), "README.md's results differ from docs/results/run.json: " \
                                              "run python tools/readme_numbers.py --write"
    run = json.loads(numbers.RESULTS.read_text())
    assert f"| FVD ↓ | {run['model']['fvd']:.3g} |" in block
    assert f"{sum(run['claims']['verdicts'].values())} answered" in block


def _reports(folder, fvd: float):
    """A run's reports/ as evaluate, claims and the training stages write them (the fields read)."""
    folder.mkdir()
    base = {"fvd": 7.5, "fid": 0.1, "efid": 0.3, "sync_c": 0.05, "sync_d": 0.9, "ssim": 0.6, "identity": 0.0}
    details = {**{k: 0.5 for k in numbers.HEADLINE}, "fvd": fvd, "fvd_backend": "fvd-fallback", "n_clips": 3,
               "frames": 150, "seed": 0, "steps": 10, "identity_gt": 0.27,
               "baselines": {"static_reference": base, "ground_truth": {k: 0.0 for k in base},
                             "autoencoder": base, "reversed_ground_truth": base},
               "long_term": {"seconds": 30.0, "ssim_first": 0.6, "ssim_last": 0.5, "identity_drift": 0.01,
                             "identity_gt_drift": 0.1}}
    (folder / "metrics_details.json").write_text(json.dumps(details))
    (folder / "metrics.json").write_text(json.dumps({k: details[k] for k in numbers.HEADLINE}
                                                    | {"failure_rate": 0.04, "seconds_per_frame": 0.05}))
    (folder / "claims.json").write_text(json.dumps({"seeds": [0, 1, 2], "claims": [
        {"verdict": "supported"}, {"verdict": "inconclusive"}, {"verdict": "inconclusive"}]}))
    (folder / "train_stage2.json").write_text(json.dumps({"wall_s": 20.4}))


def test_a_snapshot_of_a_run_gives_its_numbers_and_a_changed_number_changes_the_block(tmp_path):
    _reports(tmp_path / "a", fvd=2.5)
    _reports(tmp_path / "b", fvd=3.25)
    blocks = []
    for name in ("a", "b"):
        run = numbers.snapshot(tmp_path / name, label=f"run {name}")
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
        blocks.append(numbers.render_results(tmp_path / f"{name}.json"))
    assert "| FVD ↓ | 2.5 | 7.5 | 7.5 | 0 |" in blocks[0] and "| FVD ↓ | 3.25 |" in blocks[1]
    assert "3 answered: 1 supported, 0 refuted, 2 inconclusive" in blocks[0]
    assert "4.0 %" in blocks[0] and "train_stage2 20 s" in blocks[0] and "snapshot of run a" in blocks[0]
    assert "Long-term clip (30 s): SSIM 0.6 in the first window, 0.5 in the last" in blocks[0]


def test_readme_quality_block_is_rendered_from_the_end_to_end_attempts(tmp_path):
    block = numbers.readme_block(begin=numbers.QUALITY_BEGIN, end=numbers.QUALITY_END)
    assert block is not None, "README.md has no quality block"
    assert block == numbers.render_quality(), "README.md's quality table differs from reports/quality_attempts.json: " \
                                              "run python benchmarks/quality_attempts.py, then tools/readme_numbers.py --write"
    tables = json.loads(numbers.QUALITY.read_text())
    for row in tables["end_to_end"]:
        assert f"| {row['attempt']} | {row['change']} |" in block
    tables["end_to_end"] = [{"attempt": "e2e_x", "change": "a run", "main_line_min": 12.5, "identity_gap": "0.2 (no)",
                             "targets_met": "3/7", "machine": "2 cores, idle"}]
    (tmp_path / "qa.json").write_text(json.dumps(tables))
    changed = numbers.render_quality(tmp_path / "qa.json")
    assert "| e2e_x | a run | 12.5 | n/a | n/a | 0.2 (no) |" in changed and "| 3/7 | 2 cores, idle |" in changed
