"""benchmarks/bench_streaming.py: `mcdm generate --stream`'s path in a fresh subprocess per length, its time to
first frame and real-time factor merged into reports/benchmarks.json (key ``streaming``). Here one short
length with the embedded default's tiny model into a temporary file."""
from __future__ import annotations

import json

from bench_scripts import load_benchmark


def test_streaming_benchmark_reports_first_frame_and_real_time_factor(tmp_path):
    bench = load_benchmark("bench_streaming")
    out = tmp_path / "benchmarks.json"
    out.write_text(json.dumps({"generation": {"kept": 1}}))
    assert bench.main(["--lengths", "2", "--steps", "1", "--prior-steps", "1", "--params", str(tmp_path / "none.yaml"),
                       "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["generation"] == {"kept": 1}  # the other sections are left alone
    run = data["streaming"]["2s"]
    assert (run["frames"], run["size"], run["fragments"]) == (50, "512x512", 2)
    assert 0 < run["first_frame_seconds"] < run["generate_seconds"] and run["real_time_factor"] > 0
    assert run["cpu_real_time_factor"] > 0 and run["peak_rss_mb"] > 100
