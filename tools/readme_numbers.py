"""README's measured numbers, generated from the files the benchmark scripts write (never typed by hand).

    python tools/readme_numbers.py            # check: exit 1 when README's block differs from the files
    python tools/readme_numbers.py --write    # rewrite README's block from reports/benchmarks.json

The block between ``BEGIN`` and ``END`` holds streaming (benchmarks/bench_streaming.py), long-term
generation at constant memory (benchmarks/bench_generation.py) and per-stage training throughput
(benchmarks/bench_train_stages.py). tests/test_readme_numbers.py checks that it matches the
committed ``reports/benchmarks.json``. (The evaluation's metrics, reports/metrics.json, are a DVC output
that a checkout does not have: they are not in this block.)
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


def readme_block(readme: Path = ROOT / "README.md") -> str | None:
    m = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), readme.read_text(encoding="utf-8"), re.S)
    return m.group(0) if m else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite README's block")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    current, wanted = readme_block(readme), render()
    if current is None:
        print("README.md has no numbers block", file=sys.stderr)
        return 1
    if args.write:
        readme.write_text(readme.read_text(encoding="utf-8").replace(current, wanted), encoding="utf-8")
        print("wrote README.md's numbers block")
        return 0
    if current != wanted:
        print("README.md's numbers block differs from reports/benchmarks.json: run tools/readme_numbers.py --write",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
