"""benchmarks/bench_train_stages.py: the stages' own metrics copied into reports/benchmarks.json."""
from __future__ import annotations

import json

import pytest
from bench_scripts import load_benchmark

from mcdm.errors import McdmError


def _bench():
    return load_benchmark("bench_train_stages")


def test_end_to_end_rate_and_merge_keep_other_sections(tmp_path):
    bench = _bench()
    for k, (batch, run, wall) in {1: (2, 160, 80.0), 2: (4, 150, 40.0), 3: (2, 150, 100.0)}.items():
        (tmp_path / f"train_stage{k}.json").write_text(json.dumps(
            {"samples_per_s": 9.0, "batch_size": batch, "steps": run, "steps_run": run, "train_wall_s": wall,
             "peak_rss_mb": 900.0, "device": "cpu"}))
    out = tmp_path / "benchmarks.json"
    out.write_text(json.dumps({"generation": {"kept": 1}}))
    assert bench.main(["--reports", str(tmp_path), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["generation"] == {"kept": 1}
    cpu = data["train_stages"]["cpu"]
    assert cpu["stage1"]["samples_per_s_end_to_end"] == pytest.approx(160 * 2 / 80.0)
    assert cpu["stage2"]["samples_per_s_end_to_end"] == pytest.approx(150 * 4 / 40.0)
    assert cpu["stage3"]["samples_per_s"] == 9.0 and len(cpu["machine"]["load_average_now"]) == 3


def test_missing_stage_metrics_name_the_stage(tmp_path):
    with pytest.raises(McdmError, match="train_stage1"):
        _bench().collect(tmp_path)
