"""Benchmark: training throughput of the three MCDM stages, as measured by the pipeline's own runs.

Every ``mcdm train --stage N`` writes ``reports/train_stageN.json`` with ``samples_per_s`` (median
over the run's steps; a stage-3 sample is a run of ``train.stage3.clips_per_run`` clips, so
``clips_per_s`` is given too), ``batch_size``, ``steps``, ``train_wall_s``, ``wall_s`` and
``peak_rss_mb``. ``samples_per_s`` times the optimizer steps only (forward, backward, step); this
script adds ``samples_per_s_end_to_end`` = steps run x batch / ``train_wall_s`` (data loading,
logging and checkpoints included) and the load average, and copies the figures into
``reports/benchmarks.json`` under
``train_stages.<device>`` (merged into the existing file, write-then-rename), so the training speed sits
beside the other benchmarks. Run it after ``dvc repro train_stage3``:

    python benchmarks/bench_train_stages.py [--reports reports] [--out reports/benchmarks.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from mcdm.benchmark_results import merge_section
from mcdm.errors import McdmError

FIELDS = ("samples_per_s", "clips_per_s", "batch_size", "steps", "steps_run", "train_wall_s", "wall_s",
          "peak_rss_mb", "trainable_parameters", "loss_first10", "loss_last10", "variant")


def collect(reports: Path) -> tuple[str, dict]:
    figures, devices = {}, set()
    for stage in (1, 2, 3):
        path = reports / f"train_stage{stage}.json"
        if not path.is_file():
            raise McdmError(f"missing {path}: run `dvc repro train_stage{stage}` first")
        metrics = json.loads(path.read_text())
        figures[f"stage{stage}"] = {k: metrics.get(k) for k in FIELDS}
        run, batch, wall = metrics.get("steps_run"), metrics.get("batch_size"), metrics.get("train_wall_s")
        figures[f"stage{stage}"]["samples_per_s_end_to_end"] = (run * batch / wall) if run and batch and wall else None
        devices.add(str(metrics.get("device", "cpu")).split(":")[0])
    device = "cuda" if "cuda" in devices else "cpu"
    figures["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average_now": [round(x, 2) for x in os.getloadavg()]}
    return device, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks.json"))
    args = parser.parse_args(argv)
    device, figures = collect(args.reports)
    merge_section(args.out, "train_stages", {device: figures})
    for stage in ("stage1", "stage2", "stage3"):
        f = figures[stage]
        print(f"{stage}: {f['samples_per_s']:.2f} samples/s in steps, {f['samples_per_s_end_to_end'] or 0:.2f} end to end "
              f"(batch {f['batch_size']}, {f['steps']} steps, "
              f"{f['train_wall_s']:.0f} s training, peak RSS {f['peak_rss_mb']:.0f} MiB)")
    print(f"wrote {args.out} [train_stages.{device}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
