"""README's measured numbers come from the files the benchmarks write (issue #21 point 9): the block
between the numbers markers is what tools/readme_numbers.py renders from the committed
reports/benchmarks.json, and a changed figure in that file changes the block."""
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
