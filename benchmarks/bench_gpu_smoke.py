"""Benchmark: a 256 px bf16 smoke of each training stage on a GPU (samples/s and peak GPU memory).

The three stages run through the pipeline's own code (``build_task``, ``train_loop`` with the
DeepSpeed ZeRO-2 config, ``export_stage`` chaining stage 1 -> 2 -> 3) on a synthetic project
(:mod:`mcdm.train.synthetic`): the paper profile's model (``configs/paper.yaml``: SD-1.5-shaped
UNet with gradient checkpointing, 16-frame clips, 16 archived frames, batch 4, wav2vec2-wide audio)
at 256 px (32 x 32 latents), with random weights, since no pretrained weights can be fetched. So
the figures are speed and memory only; the losses say nothing about quality.

Per stage it records the median samples/s over the steps after ``--warmup`` (forward, backward,
optimizer step; a stage-3 sample is a run of ``clips_per_run`` clips), peak GPU memory allocated and
reserved (``torch.cuda.max_memory_*``, reset before each stage), trainable parameters and the
precision DeepSpeed ran in, and merges them into ``reports/benchmarks.json`` under
``train_stages_smoke["<device name>, <resolution> px, (non-)deterministic"]``. Without a GPU it stops, unless ``--allow-cpu`` (the test runs
the same code on a tiny model that way):

    python benchmarks/bench_gpu_smoke.py [--resolution 256] [--steps 12] [--warmup 4] [--out reports/benchmarks.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mcdm.benchmark_results import merge_section
from mcdm.config import Params, deep_merge, profile_params
from mcdm.errors import McdmError

ROOT = Path(__file__).resolve().parents[1]


class SpeedRecorder:
    """What ``train_loop`` logs per step, kept in memory (no MLflow in a smoke run)."""

    run_id = None

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        if "samples_per_s" in metrics:
            self.rows.append({"step": step, **metrics})

    def resumed(self, step: int, previous_run) -> None:
        raise McdmError(f"smoke run resumed at step {step}: its checkpoint folder was not empty")


def smoke_params(resolution: int, steps: int, profile: str = "paper", overrides: dict | None = None) -> Params:
    """The profile's params at ``resolution`` with ``steps`` steps per stage (one checkpoint, at the end)."""
    base = profile_params(profile, ROOT / "configs").model_dump(mode="json")
    stages = {f"stage{k}": {"steps": steps} for k in (1, 2, 3)}
    merged = deep_merge(base, {"data": {"resolution": resolution}, "tracking": {"system_metrics": False},
                               "train": {"checkpoint_every": steps, "keep_checkpoints": 1,
                                         "deepspeed_config": str(ROOT / "configs" / "deepspeed" / "zero2.json"),
                                         **stages}})
    return Params.model_validate(deep_merge(merged, overrides or {}))


def run_smoke(params: Params, workdir: Path, *, latent: int, warmup: int, n_frames: int = 96,
              vae_widths: tuple[int, ...] = (8, 8, 8, 8)) -> dict:
    """Write the synthetic project under ``workdir``, train the three stages in order and return
    their figures."""
    from mcdm.train.distributed import on_gpu
    from mcdm.train.engine import train_loop
    from mcdm.train.stages.export import export_stage
    from mcdm.train.stages.run import build_task, stage_spec
    from mcdm.train.synthetic import inputs_for, write_project

    t0 = time.time()
    write_project(workdir, params, res=params.data.resolution, latent=latent, n_videos=5, n_frames=n_frames,
                  vae_widths=vae_widths)
    figures: dict = {"project_write_s": round(time.time() - t0, 1)}
    for stage in (1, 2, 3):
        started = time.time()
        if on_gpu():
            torch.cuda.reset_peak_memory_stats()
        task = build_task(params, stage, inputs_for(workdir, stage), show_progress=False)
        spec = stage_spec(task, workdir / "checkpoints" / f"stage{stage}")
        trained = [p for p in task.model.parameters() if p.requires_grad]
        recorder = SpeedRecorder()
        result = train_loop(task.model, lambda engine, batch: engine(batch), task.dataset, spec, tracker=recorder)
        speeds = [r["samples_per_s"] for r in recorder.rows[warmup:]] or [r["samples_per_s"] for r in recorder.rows]
        dtype = next(p.dtype for p in result.engine.module.parameters() if p.requires_grad)
        out = {
            "steps": result.steps, "warmup_steps_excluded": min(warmup, len(recorder.rows) - 1),
            "batch_size": spec.batch_size, "samples_per_item": task.samples_per_item,
            "samples_per_s": statistics.median(speeds),
            "clips_per_s": statistics.median(speeds) * task.samples_per_item,
            "step_s_median": statistics.median(spec.batch_size / s for s in speeds),
            "loss_first": recorder.rows[0]["loss"], "loss_last": recorder.rows[-1]["loss"],
            "trainable_parameters": sum(p.numel() for p in trained),
            "total_parameters": sum(p.numel() for p in task.model.parameters()),
            "compute_dtype": str(dtype).replace("torch.", ""),
            "gradient_checkpointing": spec.gradient_checkpointing,
            "train_wall_s": round(result.wall_s, 1),
        }
        if on_gpu():
            out["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            out["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        export_stage(task, workdir / "models" / f"stage{stage}", result.rank, {"steps": result.steps})
        out["wall_s"] = round(time.time() - started, 1)
        figures[f"stage{stage}"] = out
        print(f"stage {stage}: {out['samples_per_s']:.2f} samples/s ({out['clips_per_s']:.2f} clips/s), "
              f"{out.get('peak_gpu_allocated_mib', float('nan')):.0f} MiB peak GPU allocated, "
              f"{out['trainable_parameters'] / 1e6:.1f}M of {out['total_parameters'] / 1e6:.1f}M parameters "
              f"trained in {out['compute_dtype']}, loss {out['loss_first']:.4f} -> {out['loss_last']:.4f}",
              flush=True)
        del task, result, trained
        gc.collect()
        if on_gpu():
            torch.cuda.empty_cache()
    return figures


def machine() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_mib=round(props.total_memory / 2**20), cuda=torch.version.cuda)
    import deepspeed

    info["deepspeed"] = deepspeed.__version__
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="DeepSpeed steps per stage")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the median")
    parser.add_argument("--profile", default="paper", help="params profile whose model is smoked")
    parser.add_argument("--overrides", default="{}", help="JSON merged over the params (e.g. smaller models)")
    parser.add_argument("--vae-widths", default="8,8,8,8", help="the random VAE's widths (only its config is used)")
    parser.add_argument("--workdir", type=Path, default=None, help="synthetic project folder (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks.json")
    parser.add_argument("--json", type=Path, default=None, help="also write this run's figures here")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (plumbing check only)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("bench_gpu_smoke: no CUDA GPU here (pass --allow-cpu for a plumbing run on CPU)")
    if args.resolution % 8:
        raise SystemExit(f"bench_gpu_smoke: --resolution {args.resolution} is not a multiple of 8 (the VAE's factor)")
    overrides = json.loads(args.overrides)
    params = smoke_params(args.resolution, args.steps, args.profile, overrides)
    vae_widths = tuple(int(w) for w in args.vae_widths.split(","))
    latent = args.resolution // 2 ** (len(vae_widths) - 1)
    with tempfile.TemporaryDirectory(prefix="mcdm-gpu-smoke-") as tmp:
        workdir = args.workdir or Path(tmp)
        figures = run_smoke(params, workdir, latent=latent, warmup=args.warmup, vae_widths=vae_widths)
    figures.update(machine=machine(), deterministic=params.train.deterministic, resolution=args.resolution, latent=latent, profile=args.profile,
                   overrides=overrides, synthetic_random_weights=True)
    key = (f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}, {args.resolution} px, "
           f"{'deterministic' if params.train.deterministic else 'non-deterministic'}")
    merge_section(args.out, "train_stages_smoke", {key: figures})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out} [train_stages_smoke.{key}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
