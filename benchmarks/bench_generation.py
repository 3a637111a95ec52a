"""Benchmark: long-term generation at constant memory, time per frame, and FLOPs per frame at paper scale.

1. ``constant_memory`` — the tiny model (the params' embedded-default sizes, untrained weights) generates
   10 s and 120 s of video from one portrait, each in a FRESH subprocess, streaming the frames into an
   mp4 as ``mcdm generate`` does. Reports peak RSS (``ru_maxrss``), the RSS after every tenth of the
   clips, and the CPU and wall time per frame after the first clip. Pass: peak RSS differs by < 10 %
   and CPU time per frame by < 15 % between the two lengths (CPU time, because wall time on a shared
   machine measures the neighbours' load; it is reported beside it). (``--steps`` denoising steps, 2 by default, keep the 120 s
   run short: the number of steps changes the work per clip, not what is carried between clips.)
2. ``cpu_time_per_frame`` — the tiny model at ``eval.steps`` denoising steps and
   ``model.prior_inference_steps`` prior steps (what ``mcdm evaluate`` runs), in a fresh subprocess.
3. ``paper_flops_per_frame`` — the paper profile (``configs/paper.yaml``: 512 px, 16-frame clips,
   SD-1.5-sized UNet, 8-layer prior) built on the meta device and counted with
   ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions): per clip
   ``steps`` denoiser calls + the archived-clip prior once + ``prior_steps`` motion-prior calls, divided
   by the clip's frames, plus the VAE decode of one frame.

Writes ``reports/benchmarks.json`` key ``generation`` (merged into the file, atomic rename). Usage:

    python benchmarks/bench_generation.py [--params params.yaml] [--out reports/benchmarks.json] [--steps 2]
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

LENGTHS = (10.0, 120.0)
RSS_TOLERANCE, TIME_TOLERANCE = 0.10, 0.15


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _load_params(path: str | None):
    from mcdm.config import Params, load_params

    return load_params(path) if path and Path(path).exists() else Params()


# -------------------------------------------------------------------------------------- worker process
def worker(args) -> dict:
    """Generate ``args.seconds`` of video with the tiny untrained pipeline; print one JSON line."""
    import numpy as np
    import skimage.data
    import torch

    from mcdm.data.io import write_video
    from mcdm.models.pipeline import build_untrained_pipeline
    from mcdm.models.pipeline_inputs import crop_portrait

    torch.set_num_threads(args.threads)
    params = _load_params(args.params)
    pipe = build_untrained_pipeline(params, seed=0)
    fps, rate = params.data.fps, params.data.audio_rate
    portrait = crop_portrait(skimage.data.astronaut(), pipe.data_params)
    n_frames = int(round(args.seconds * fps))
    t = np.arange(int(round(n_frames / fps * rate))) / rate
    audio = (0.3 * np.sin(2 * np.pi * 200 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    ref_latent, ref_emb = pipe.encode_reference(portrait.image[None], portrait.landmarks[None])
    feats = pipe.audio_features(audio, n_frames)[None]
    clips = pipe.iter_clips(ref_latent, ref_emb, feats, num_inference_steps=args.steps, prior_steps=args.prior_steps,
                            generator=torch.Generator().manual_seed(0))
    n_clips = -(-n_frames // pipe.config.clip_frames)
    marks = {max(1, round(n_clips * q / 10)) for q in range(1, 11)}
    rss, clip_times, last = [], [], [(time.perf_counter(), time.process_time())]
    state_bytes = []

    def frames():
        for clip in clips:
            now = (time.perf_counter(), time.process_time())
            clip_times.append((now[0] - last[0][0], now[1] - last[0][1], clip.frames.shape[1]))
            last[0] = now
            carried = sum(v.numel() * v.element_size() for v in (clip.memory_state or {}).values())
            state_bytes.append(carried + clip.archived_latents.numel() * clip.archived_latents.element_size())
            if clip.index + 1 in marks:
                rss.append(round(_rss_mb(), 1))
            yield from clip.frames[0]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_video(Path(tmp) / "bench.mp4", frames(), fps=fps, audio=audio, audio_rate=rate)
    wall = time.perf_counter() - started
    steady = clip_times[1:] or clip_times  # the first clip pays one-off costs (allocations, caches)
    return {
        "seconds": args.seconds, "frames": n_frames, "clips": n_clips, "steps": args.steps,
        "prior_steps": args.prior_steps, "threads": args.threads,
        "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_mb_by_tenth_of_clips": rss,
        "carried_state_bytes": sorted(set(state_bytes)),
        "seconds_per_frame": sum(t for t, _, _ in steady) / sum(n for _, _, n in steady),
        "cpu_seconds_per_frame": sum(c for _, c, _ in steady) / sum(n for _, _, n in steady),
        "wall_s": round(wall, 2),
    }


def run_worker(seconds: float, steps: int, prior_steps: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--seconds", str(seconds), "--steps", str(steps),
           "--prior-steps", str(prior_steps), "--threads", str(args.threads)]
    if args.params:
        cmd += ["--params", args.params]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker ({seconds} s) failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------- FLOPs
def paper_flops(configs_dir: str = "configs") -> dict:
    """FLOPs per generated frame of the paper profile, counted on the meta device (no weights, no memory)."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from mcdm.config import profile_params
    from mcdm.models.motion_prior import PresentClipMotionPrior
    from mcdm.models.variants import build_denoiser

    params = profile_params("paper", configs_dir)
    m, side = params.model, params.data.resolution
    latent = side // 8
    f, a = m.clip_frames, m.archived_frames
    audio_dim = clip_dim = 768  # wav2vec2-base hidden size; CLIP ViT-L/14 projection
    with torch.device("meta"):
        den = build_denoiser(params).eval()
        prior = PresentClipMotionPrior.from_params(m, audio_dim=audio_dim, ref_dim=clip_dim,
                                                   landmark_dim=4 * m.landmark_guider_channels[-1]).eval()
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            sample_size=side).eval()
        for model in (den, prior, vae):  # the flop counter's module hooks need inputs without autograd history
            model.requires_grad_(False)
        sample = torch.randn(1, 4, f, latent, latent)
        ref, archived = torch.randn(1, 4, latent, latent), torch.randn(1, a, 4, latent, latent)
        present = torch.randn(1, f, 3, m.prior_dim)
        motion = [torch.randn(1, f, d) for d in (6, m.lip_dim, m.expression_dim)]
        audio, ref_emb = torch.randn(1, f, audio_dim), torch.randn(1, clip_dim)
        z = torch.randn(1, 4, latent, latent)

    def count(fn) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    archived_tokens = None

    def encode():
        nonlocal archived_tokens
        archived_tokens = den.encode_archived(ref, archived)

    archived_flops = count(encode)
    memory = den(sample, 500, archived_tokens=archived_tokens, present_tokens=present).memory_state
    unet_flops = count(lambda: den(sample, 500, archived_tokens=archived_tokens, present_tokens=present,
                                   memory_state=memory))
    prior_flops = count(lambda: prior(*motion, torch.tensor([500]), audio, ref_emb))
    decode_flops = count(lambda: vae.decode(z))
    steps, prior_steps = params.eval.steps, m.prior_inference_steps
    per_clip = steps * unet_flops + archived_flops + prior_steps * prior_flops
    return {
        "profile": "paper", "resolution": side, "clip_frames": f, "archived_frames": a, "steps": steps,
        "prior_steps": prior_steps, "denoiser_parameters": sum(p.numel() for p in den.parameters()),
        "denoiser_flops_per_call": unet_flops, "archived_prior_flops_per_clip": archived_flops,
        "motion_prior_flops_per_call": prior_flops, "vae_decode_flops_per_frame": decode_flops,
        "flops_per_frame": per_clip / f + decode_flops,
        "tflops_per_frame": round((per_clip / f + decode_flops) / 1e12, 3),
        "counted": "torch.utils.flop_counter (matmul, conv, attention); elementwise ops excluded",
    }


def write_merged(path: Path, figures: dict) -> None:
    """Merge ``figures`` into ``path`` under ``generation``; write-then-rename."""
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text() or "{}")
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}: not valid JSON ({err}); fix or remove it") from None
    data["generation"] = figures
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (defaults of the schema if absent)")
    parser.add_argument("--out", default="reports/benchmarks.json")
    parser.add_argument("--configs", default="configs", help="folder of paper.yaml")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of the 10 s / 120 s runs")
    parser.add_argument("--prior-steps", type=int, default=2, help="motion-prior steps of the 10 s / 120 s runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    import torch

    params = _load_params(args.params)
    runs = {f"{s:g}s": run_worker(s, args.steps, args.prior_steps, args) for s in LENGTHS}
    short, long = runs[f"{LENGTHS[0]:g}s"], runs[f"{LENGTHS[1]:g}s"]
    rss_ratio = long["peak_rss_mb"] / short["peak_rss_mb"] - 1
    time_ratio = long["cpu_seconds_per_frame"] / short["cpu_seconds_per_frame"] - 1
    wall_ratio = long["seconds_per_frame"] / short["seconds_per_frame"] - 1
    at_eval = run_worker(4.0, params.eval.steps, params.model.prior_inference_steps, args)
    figures = {
        "device": platform.processor() or "cpu", "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "tiny_model": {"resolution": params.data.resolution, "clip_frames": params.model.clip_frames,
                       "archived_frames": params.model.archived_frames,
                       "block_out_channels": params.model.block_out_channels},
        "constant_memory": {
            "runs": runs,
            "peak_rss_change": round(rss_ratio, 4), "cpu_seconds_per_frame_change": round(time_ratio, 4),
            "wall_seconds_per_frame_change": round(wall_ratio, 4),
            "peak_rss_within_10pct": abs(rss_ratio) < RSS_TOLERANCE,
            "cpu_seconds_per_frame_within_15pct": abs(time_ratio) < TIME_TOLERANCE,
            "note": "time per frame compared on CPU time (process_time): the shared machine's load makes wall "
                    "time noisy; wall time is reported beside it",
        },
        "cpu_time_per_frame": at_eval,
        "paper_flops_per_frame": paper_flops(args.configs),
    }
    write_merged(Path(args.out), figures)
    cm, pf = figures["constant_memory"], figures["paper_flops_per_frame"]
    for name, r in runs.items():
        print(f"{name:>5s}: {r['frames']} frames, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"{r['cpu_seconds_per_frame'] * 1e3:.1f} ms CPU / {r['seconds_per_frame'] * 1e3:.1f} ms wall per frame "
              f"({r['steps']} steps), carried state {r['carried_state_bytes']} B")
    print(f"peak RSS {cm['peak_rss_change']:+.1%} (< 10%: {cm['peak_rss_within_10pct']}), CPU time per frame "
          f"{cm['cpu_seconds_per_frame_change']:+.1%} (< 15%: {cm['cpu_seconds_per_frame_within_15pct']}), "
          f"wall {cm['wall_seconds_per_frame_change']:+.1%}")
    print(f"tiny model at eval.steps={params.eval.steps}: {at_eval['cpu_seconds_per_frame']:.3f} s CPU "
          f"({at_eval['seconds_per_frame']:.3f} s wall) per frame ({args.threads} thread(s))")
    print(f"paper scale: {pf['tflops_per_frame']} TFLOPs per frame ({pf['steps']} steps, {pf['resolution']} px)")
    print(f"wrote {args.out} [generation]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
