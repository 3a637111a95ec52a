"""Benchmark: ``mcdm generate --stream`` — time to first frame and real-time factor for short and long speech.

Each length runs in a FRESH subprocess: the tiny model (the params' embedded-default sizes, untrained
weights) generates the portrait (``skimage``'s astronaut, 512 x 512, the face pasted back full frame)
speaking a speech-like tone of that length through :func:`mcdm.pipelines.video.generate_video` with
``stream=True``: a fragmented MP4 written as the clips finish, as ``mcdm generate --stream`` writes it.
Reports per length:

- ``first_frame_seconds``: from the first network call until the first playable fragment (one
  second of video, ``fragment_seconds``) is on disk: what a viewer waits;
- ``real_time_factor``: wall seconds of generation per second of video (below 1: faster than real time);
- ``cpu_real_time_factor``: the same on the process's CPU time (the shared machine's load makes wall
  time noisy), peak RSS, the file's size and its fragments.

``--steps`` denoising steps and ``--prior-steps`` prior steps (2 each by default) keep the long run
short: the steps change the work per clip, not what streaming adds. Writes ``reports/benchmarks.json``
key ``streaming`` (one entry per length; the file's other keys kept). Usage:

    python benchmarks/bench_streaming.py [--lengths 10,600] [--steps 2] [--prior-steps 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mcdm.benchmark_results import merge_section

LENGTHS = (10.0, 600.0)


def worker(args) -> dict:
    """Stream ``args.seconds`` of video with the tiny untrained pipeline; print one JSON line."""
    import numpy as np
    import skimage.data
    import torch

    from mcdm.config import Params, deep_merge, load_params
    from mcdm.pipelines.video import generate_video
    from mcdm.train.builders import build_untrained_pipeline

    torch.set_num_threads(args.threads)
    base = load_params(args.params) if args.params and Path(args.params).exists() else Params()
    params = Params.model_validate(deep_merge(base.model_dump(mode="json"),
                                              {"model": {"prior_inference_steps": args.prior_steps}}))
    pipe = build_untrained_pipeline(params, seed=0)
    pipe.set_progress_bar_config(disable=True)
    rate = params.data.audio_rate
    t = np.arange(int(round(args.seconds * rate))) / rate
    audio = (0.3 * np.sin(2 * np.pi * 200 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="mcdm-bench-stream-") as tmp:
        out = Path(tmp) / "stream.mp4"
        cpu, wall = time.process_time(), time.perf_counter()
        result = generate_video(pipe, skimage.data.astronaut(), audio, out, seconds=args.seconds, steps=args.steps,
                                stream=True)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        data = out.read_bytes()
    return {
        "seconds": args.seconds, "frames": result.n_frames, "size": f"{result.width}x{result.height}",
        "steps": args.steps, "prior_steps": args.prior_steps, "threads": args.threads,
        "first_frame_seconds": round(result.first_frame_seconds, 3),
        "real_time_factor": round(result.real_time_factor, 4),
        "cpu_real_time_factor": round(cpu / result.video_seconds, 4),
        "generate_seconds": round(result.generate_seconds, 2), "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "file_mb": round(len(data) / 2**20, 2), "fragments": data.count(b"moof"),
    }


def run_worker(seconds: float, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--seconds", str(seconds), "--steps", str(args.steps),
           "--prior-steps", str(args.prior_steps), "--threads", str(args.threads), "--params", args.params]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
        raise SystemExit(f"worker ({seconds} s) failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (defaults of the schema if absent)")
    parser.add_argument("--out", default="reports/benchmarks.json")
    parser.add_argument("--lengths", default=",".join(f"{s:g}" for s in LENGTHS), help="seconds of speech, comma-separated")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prior-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    import torch

    for seconds in (float(s) for s in args.lengths.split(",")):
        run = run_worker(seconds, args)
        print(f"{seconds:g} s: first frame after {run['first_frame_seconds']} s, real-time factor "
              f"{run['real_time_factor']} (CPU {run['cpu_real_time_factor']}), peak RSS {run['peak_rss_mb']} MB")
        merge_section(args.out, "streaming", {
            f"{seconds:g}s": run, "device": platform.processor() or "cpu", "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "note": "mcdm generate --stream's path (generate_video, stream=True: fragmented MP4, face pasted back into "
                    "a 512x512 portrait) with the tiny untrained model; each length a fresh subprocess; wall time on "
                    "a shared machine: cpu_real_time_factor is the steadier figure"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
