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
4. ``full_history_baseline`` — the run of 1. at a few lengths (4 s, 16 s, 48 s), each in a fresh
   subprocess, once with the model's MTA and once with every temporal attention swapped for the
   benchmark-only full-history softmax attention (``full_history_attention.py``: keys / values of every
   earlier frame cached, exact softmax over [history ; present]; what ``wo_mta`` would have to carry to
   see the whole past). Reports per length peak RSS, the state carried to the next clip, the frames of
   history it holds, and the CPU time per frame of the last clips; plots them (``--plot``).

Writes ``reports/benchmarks.json`` key ``generation`` (its parts merged into the key, the file's other
keys kept; atomic rename). Usage:

    python benchmarks/bench_generation.py [--params params.yaml] [--out reports/benchmarks.json] [--steps 2]
        [--parts constant_memory,cpu_time_per_frame,paper_flops_per_frame,full_history_baseline]
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

LENGTHS = (10.0, 120.0)
RSS_TOLERANCE, TIME_TOLERANCE = 0.10, 0.15
BASELINE_LENGTHS = (4.0, 16.0, 48.0)
LAST_CLIPS = 8  # the baseline's CPU time per frame: median over the last clips (the longest history)
PARTS = ("constant_memory", "cpu_time_per_frame", "paper_flops_per_frame", "full_history_baseline")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _load_params(path: str | None):
    from mcdm.config import Params, load_params

    return load_params(path) if path and Path(path).exists() else Params()


# -------------------------------------------------------------------------------------- worker process
def next_clip_flops(pipe, params, memory_state, archived) -> int:
    """FLOPs of one denoiser call of the clip after ``archived`` / ``memory_state`` (the carried state).

    Deterministic, where CPU time on a shared machine is not. Attention runs on PyTorch's math backend
    here, so ``FlopCounterMode`` sees its matrix products (the fused CPU kernel is not counted).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    den, frames = pipe.denoiser, pipe.config.clip_frames
    batch, _, channels, h, w = archived.shape
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tokens = den.encode_archived(archived[:, -1], archived)
        sample = torch.randn(batch, channels, frames, h, w, generator=g)
        present = torch.randn(batch, frames, 3, params.model.prior_dim, generator=g)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            den(sample, 500, archived_tokens=tokens, present_tokens=present, memory_state=memory_state)
    return int(counter.get_total_flops())


def worker(args) -> dict:
    """Generate ``args.seconds`` of video with the tiny untrained pipeline; print one JSON line."""
    import numpy as np
    import skimage.data
    import torch

    from mcdm.media.io import write_video
    from mcdm.pipelines.preprocessing import crop_portrait
    from mcdm.train.builders import build_untrained_pipeline

    torch.set_num_threads(args.threads)
    params = _load_params(args.params)
    pipe = build_untrained_pipeline(params, seed=0)
    if args.temporal == "full_history":  # the benchmark-only baseline, beside this script
        from full_history_attention import FullHistoryKVTemporalAttnProcessor

        pipe.denoiser.unet.set_temporal_processor(FullHistoryKVTemporalAttnProcessor())
    temporal = pipe.denoiser.unet.temporal_processor
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
    state_bytes, temporal_bytes, history_frames, final = [], [], 0, None

    def frames():
        nonlocal history_frames, final
        for clip in clips:
            now = (time.perf_counter(), time.process_time())
            clip_times.append((now[0] - last[0][0], now[1] - last[0][1], clip.frames.shape[1]))
            last[0] = now
            memory = clip.memory_state or {}
            carried = sum(v.numel() * v.element_size() for v in memory.values())
            temporal_bytes.append(carried)
            state_bytes.append(carried + clip.archived_latents.numel() * clip.archived_latents.element_size())
            # frames of the past each temporal layer holds: MTA one memory frame M_T (B, s, c); the
            # full-history baseline keys / values of every frame so far (B, s, 2, L, c)
            history_frames = max((v.shape[-2] if v.ndim == 5 else 1 for v in memory.values()), default=0)
            final = clip
            if clip.index + 1 in marks:
                rss.append(round(_rss_mb(), 1))
            yield from clip.frames[0]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_video(Path(tmp) / "bench.mp4", frames(), fps=fps, audio=audio, audio_rate=rate)
    wall = time.perf_counter() - started
    steady = clip_times[1:] or clip_times  # the first clip pays one-off costs (allocations, caches)
    # median per clip over the last clips, per denoised frame (a short last clip still denoises clip_frames)
    tail = sorted(c for _, c, _ in clip_times[-LAST_CLIPS:])
    tail_cpu = (tail[(len(tail) - 1) // 2] + tail[len(tail) // 2]) / 2 / pipe.config.clip_frames
    cpu_s = time.process_time()
    flops = next_clip_flops(pipe, params, final.memory_state, final.archived_latents)
    return {
        "seconds": args.seconds, "frames": n_frames, "clips": n_clips, "steps": args.steps,
        "prior_steps": args.prior_steps, "threads": args.threads, "temporal_attention": temporal.kind,
        "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_mb_by_tenth_of_clips": rss,
        "carried_state_bytes": sorted(set(state_bytes)),
        "final_carried_state_bytes": state_bytes[-1], "final_temporal_state_bytes": temporal_bytes[-1],
        "final_history_frames": history_frames,
        "seconds_per_frame": sum(t for t, _, _ in steady) / sum(n for _, _, n in steady),
        "cpu_seconds_per_frame": sum(c for _, c, _ in steady) / sum(n for _, _, n in steady),
        "cpu_seconds_per_frame_last_clips": tail_cpu,
        "next_clip_denoiser_flops_per_frame": flops * args.steps // pipe.config.clip_frames,
        "wall_s": round(wall, 2), "cpu_s": round(cpu_s, 2),
    }


def run_worker(seconds: float, steps: int, prior_steps: int, args, temporal: str = "model") -> dict:
    cmd = [sys.executable, __file__, "--worker", "--seconds", str(seconds), "--steps", str(steps),
           "--prior-steps", str(prior_steps), "--threads", str(args.threads), "--temporal", temporal]
    if args.params:
        cmd += ["--params", args.params]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker ({seconds} s, {temporal}) failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------- FLOPs
def paper_flops(configs_dir: str = "configs") -> dict:
    """FLOPs per generated frame of the paper profile, counted on the meta device (no weights, no memory)."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from mcdm.config import profile_params
    from mcdm.train.builders import build_denoiser, motion_prior_from_params

    params = profile_params("paper", configs_dir)
    m, side = params.model, params.data.resolution
    latent = side // 8
    f, a = m.clip_frames, m.archived_frames
    audio_dim = clip_dim = 768  # wav2vec2-base hidden size; CLIP ViT-L/14 projection
    with torch.device("meta"):
        den = build_denoiser(params).eval()
        prior = motion_prior_from_params(m, audio_dim=audio_dim, ref_dim=clip_dim,
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


def full_history_baseline(args) -> dict:
    """MTA vs the full-history softmax baseline at ``args.baseline_lengths``, each run its own subprocess."""
    kinds = {"mta": "model", "full_history_softmax": "full_history"}
    runs = {kind: {} for kind in kinds}
    for seconds in args.baseline_lengths:  # interleaved, so a change in the machine's load hits both
        for kind, temporal in kinds.items():
            r = run_worker(seconds, args.steps, args.prior_steps, args, temporal=temporal)
            runs[kind][f"{seconds:g}s"] = {
                "seconds": r["seconds"], "frames": r["frames"], "clips": r["clips"],
                "temporal_attention": r["temporal_attention"], "peak_rss_mb": r["peak_rss_mb"],
                "carried_state_bytes": r["final_carried_state_bytes"],
                "temporal_state_bytes": r["final_temporal_state_bytes"],
                "history_frames": r["final_history_frames"],
                "cpu_seconds_per_frame_last_clips": r["cpu_seconds_per_frame_last_clips"],
                "denoiser_flops_per_frame": r["next_clip_denoiser_flops_per_frame"],
                "cpu_seconds_per_frame": r["cpu_seconds_per_frame"], "cpu_s": r["cpu_s"], "wall_s": r["wall_s"],
            }
    if runs["mta"][f"{args.baseline_lengths[0]:g}s"]["temporal_attention"] != "mta":
        raise SystemExit("full_history_baseline: the params' model has no MTA (variant must be full)")
    first, last = f"{args.baseline_lengths[0]:g}s", f"{args.baseline_lengths[-1]:g}s"
    change = {"from": first, "to": last, **{
        kind: {key: round(rows[last][key] / rows[first][key] - 1, 4)
               for key in ("peak_rss_mb", "carried_state_bytes", "cpu_seconds_per_frame_last_clips",
                           "denoiser_flops_per_frame")}
        for kind, rows in runs.items()}}
    return {
        "runs": runs, "change": change, "steps": args.steps, "prior_steps": args.prior_steps,
        "last_clips": LAST_CLIPS, "load_average": [round(x, 2) for x in os.getloadavg()],
        "note": "same generation path and tiny untrained model, every run a fresh subprocess; full_history_softmax "
                "swaps every temporal attention for benchmarks/full_history_attention.py (keys and values of "
                "every earlier frame cached per layer, exact softmax of the present clip over [history ; present]: "
                "per layer, wo_mta's softmax temporal attention over every frame so far, present rows). "
                "carried_state_bytes: temporal-attention state + archived latents after the last clip; "
                "history_frames: frames of the past one layer's state holds (MTA: one memory frame M_T); "
                f"cpu_seconds_per_frame_last_clips: median over the last {LAST_CLIPS} clips of CPU seconds "
                "(process_time, noisy on this shared machine) per denoised frame; denoiser_flops_per_frame: "
                "FlopCounterMode count of the next clip's denoising (steps calls) with the carried state, per "
                "frame (deterministic)",
    }


def plot_full_history(baseline: dict, path: Path) -> None:
    """CPU s / frame, carried bytes and peak RSS vs generated seconds, MTA and full history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("cpu_seconds_per_frame_last_clips", f"CPU s / frame (median, last {LAST_CLIPS} clips)", False),
              ("denoiser_flops_per_frame", "denoiser FLOPs / frame (next clip)", False),
              ("carried_state_bytes", "carried state (bytes)", True), ("peak_rss_mb", "peak RSS (MB)", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, label, log) in zip(axes, panels):
        for (kind, rows), marker in zip(baseline["runs"].items(), "os"):
            xs = [r["seconds"] for r in rows.values()]
            ax.plot(xs, [r[key] for r in rows.values()], marker=marker, label=kind.replace("_", " "))
        ax.set_xlabel("generated video (s)")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"long generation, tiny model, {baseline['steps']} denoising steps: MTA vs full-history softmax")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_merged(path: Path, figures: dict) -> None:
    """Merge ``figures`` into ``path``'s ``generation`` key (its other parts and the file's other keys kept)."""
    merge_section(path, "generation", figures)


def constant_memory(args) -> dict:
    runs = {f"{s:g}s": run_worker(s, args.steps, args.prior_steps, args) for s in LENGTHS}
    short, long = runs[f"{LENGTHS[0]:g}s"], runs[f"{LENGTHS[1]:g}s"]
    rss_ratio = long["peak_rss_mb"] / short["peak_rss_mb"] - 1
    time_ratio = long["cpu_seconds_per_frame"] / short["cpu_seconds_per_frame"] - 1
    wall_ratio = long["seconds_per_frame"] / short["seconds_per_frame"] - 1
    return {
        "runs": runs,
        "peak_rss_change": round(rss_ratio, 4), "cpu_seconds_per_frame_change": round(time_ratio, 4),
        "wall_seconds_per_frame_change": round(wall_ratio, 4),
        "peak_rss_within_10pct": abs(rss_ratio) < RSS_TOLERANCE,
        "cpu_seconds_per_frame_within_15pct": abs(time_ratio) < TIME_TOLERANCE,
        "note": "time per frame compared on CPU time (process_time): the shared machine's load makes wall "
                "time noisy; wall time is reported beside it",
    }


def _print_summary(figures: dict, params, args) -> None:
    if "constant_memory" in figures:
        cm = figures["constant_memory"]
        for name, r in cm["runs"].items():
            print(f"{name:>5s}: {r['frames']} frames, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"{r['cpu_seconds_per_frame'] * 1e3:.1f} ms CPU / {r['seconds_per_frame'] * 1e3:.1f} ms wall per "
                  f"frame ({r['steps']} steps), carried state {r['carried_state_bytes']} B")
        print(f"peak RSS {cm['peak_rss_change']:+.1%} (< 10%: {cm['peak_rss_within_10pct']}), CPU time per frame "
              f"{cm['cpu_seconds_per_frame_change']:+.1%} (< 15%: {cm['cpu_seconds_per_frame_within_15pct']}), "
              f"wall {cm['wall_seconds_per_frame_change']:+.1%}")
    if "cpu_time_per_frame" in figures:
        at_eval = figures["cpu_time_per_frame"]
        print(f"tiny model at eval.steps={params.eval.steps}: {at_eval['cpu_seconds_per_frame']:.3f} s CPU "
              f"({at_eval['seconds_per_frame']:.3f} s wall) per frame ({args.threads} thread(s))")
    if "paper_flops_per_frame" in figures:
        pf = figures["paper_flops_per_frame"]
        print(f"paper scale: {pf['tflops_per_frame']} TFLOPs per frame ({pf['steps']} steps, {pf['resolution']} px)")
    if "full_history_baseline" in figures:
        for kind, rows in figures["full_history_baseline"]["runs"].items():
            for name, r in rows.items():
                print(f"{kind:>20s} {name:>4s}: peak RSS {r['peak_rss_mb']:.0f} MB, carried "
                      f"{r['carried_state_bytes']} B ({r['history_frames']} frames of history), "
                      f"{r['cpu_seconds_per_frame_last_clips'] * 1e3:.1f} ms CPU / frame (last {LAST_CLIPS} clips), "
                      f"{r['denoiser_flops_per_frame'] / 1e6:.0f} MFLOP / frame")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (defaults of the schema if absent)")
    parser.add_argument("--out", default="reports/benchmarks.json")
    parser.add_argument("--configs", default="configs", help="folder of paper.yaml")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of the constant-memory and baseline runs")
    parser.add_argument("--prior-steps", type=int, default=2, help="motion-prior steps of those runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--baseline-lengths", default=",".join(f"{s:g}" for s in BASELINE_LENGTHS),
                        help="seconds generated by the full-history baseline runs (comma-separated)")
    parser.add_argument("--plot", default="reports/bench_full_history.png", help="the baseline's plot")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--temporal", choices=("model", "full_history"), default="model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    args.baseline_lengths = sorted(float(s) for s in args.baseline_lengths.split(","))
    import torch

    params = _load_params(args.params)
    figures = {
        "device": platform.processor() or "cpu", "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "tiny_model": {"resolution": params.data.resolution, "clip_frames": params.model.clip_frames,
                       "archived_frames": params.model.archived_frames,
                       "block_out_channels": params.model.block_out_channels},
    }
    if set(parts) == set(PARTS):  # a partial run keeps the load figure of the run that made the other parts
        figures["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if "constant_memory" in parts:
        figures["constant_memory"] = constant_memory(args)
    if "cpu_time_per_frame" in parts:
        figures["cpu_time_per_frame"] = run_worker(4.0, params.eval.steps, params.model.prior_inference_steps, args)
    if "paper_flops_per_frame" in parts:
        figures["paper_flops_per_frame"] = paper_flops(args.configs)
    if "full_history_baseline" in parts:
        figures["full_history_baseline"] = full_history_baseline(args)
        plot_full_history(figures["full_history_baseline"], Path(args.plot))
    write_merged(Path(args.out), figures)
    _print_summary(figures, params, args)
    print(f"wrote {args.out} [generation: {', '.join(parts)}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
