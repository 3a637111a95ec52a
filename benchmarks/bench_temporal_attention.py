"""Benchmark: memory-efficient temporal attention (FAVOR+ with a fixed-size memory) vs softmax.

Two views, each at lengths 64 .. 4096:

1. ``sequence`` — one attention over a sequence of L tokens: softmax (the L x L scores written out,
   and PyTorch's fused ``scaled_dot_product_attention``) vs FAVOR+ with m random features. Reports
   wall time (median of repeats), FLOPs and the largest intermediate (``attention_cost``, which the
   tests check against ``torch.utils.flop_counter``).
2. ``streaming`` — generating a long video clip by clip with L frames of history behind the current
   clip: the full-history softmax baseline (``FullHistorySoftmaxAttnProcessor``: keeps every past
   frame and attends over it) vs MTA (``MemoryTemporalAttnProcessor``: one memory frame carried).
   Reports time per clip and the bytes of state carried to the next clip.

Writes its figures into ``reports/benchmarks.json`` under ``temporal_attention.<device>`` (merged
into the existing file, atomic rename). Usage:

    python benchmarks/bench_temporal_attention.py [--device cpu|cuda] [--out reports/benchmarks.json]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from tqdm import tqdm

from mcdm.benchmark_results import merge_section
from mcdm.errors import McdmError
from mcdm.models.temporal_attention import (
    FullHistorySoftmaxAttnProcessor,
    MemoryTemporalAttnProcessor,
    attention_cost,
    favor_attention,
    orthogonal_random_features,
    softmax_attention,
)

LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_sequence(device: torch.device, heads: int, dim_head: int, features: int, repeats: int) -> list[dict]:
    rows = []
    projection = orthogonal_random_features(features, dim_head).to(device)
    for length in tqdm(LENGTHS, desc="sequence"):
        q, k, v = (torch.randn(1, heads, length, dim_head, device=device) for _ in range(3))
        with torch.no_grad():
            t_softmax = _median_seconds(lambda: softmax_attention(q, k, v), device, repeats)
            t_sdpa = _median_seconds(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats)
            t_favor = _median_seconds(lambda: favor_attention(q, k, v, projection), device, repeats)
        soft, fav = attention_cost("softmax", length, dim_head, batch=heads), attention_cost(
            "favor", length, dim_head, features, batch=heads)
        rows.append(dict(
            length=length, softmax_ms=1e3 * t_softmax, sdpa_ms=1e3 * t_sdpa, favor_ms=1e3 * t_favor,
            softmax_flops=soft.flops, favor_flops=fav.flops,
            softmax_peak_elements=soft.peak_elements, favor_peak_elements=fav.peak_elements,
        ))
    return rows


def bench_streaming(device: torch.device, tokens: int, channels: int, heads: int, clip_frames: int,
                    features: int, repeats: int) -> list[dict]:
    """Per-clip cost with L frames of history behind the clip (one video, ``tokens`` spatial positions)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=channels, heads=heads, dim_head=channels // heads).to(device).eval()
    h, archived, present = (torch.randn(clip_frames, tokens, channels, device=device) for _ in range(3))
    mta, full = MemoryTemporalAttnProcessor(alpha=0.1, num_features=features), FullHistorySoftmaxAttnProcessor()
    rows = []
    for history in tqdm(LENGTHS, desc="streaming"):
        memory = torch.randn(tokens, channels, device=device)  # MTA: one frame, whatever the history
        past = torch.randn(tokens, history, channels, device=device)  # full history: every past frame

        def run(processor, state):
            attn.set_processor(processor)
            return attn(h, archived_residual=archived, present_residual=present, memory=state,
                        num_frames=clip_frames)

        with torch.no_grad():
            t_mta = _median_seconds(lambda: run(mta, memory), device, repeats)
            t_full = _median_seconds(lambda: run(full, past), device, repeats)
            new_mta, new_full = run(mta, memory)[1], run(full, past)[1]
        rows.append(dict(
            history_frames=history, mta_ms_per_clip=1e3 * t_mta, full_history_softmax_ms_per_clip=1e3 * t_full,
            mta_state_bytes=new_mta.numel() * new_mta.element_size(),
            full_history_state_bytes=new_full.numel() * new_full.element_size(),
        ))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="reports/benchmarks.json")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (cpu only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--features", type=int, default=64, help="FAVOR+ random features m")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise McdmError("--device cuda: no CUDA device available")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    settings = dict(heads=8, dim_head=8, features=args.features, stream_tokens=64, stream_channels=64,
                    clip_frames=16, repeats=args.repeats)
    figures = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        torch=torch.__version__,
        settings=settings,
        sequence=bench_sequence(device, settings["heads"], settings["dim_head"], args.features, args.repeats),
        streaming=bench_streaming(device, settings["stream_tokens"], settings["stream_channels"], settings["heads"],
                                  settings["clip_frames"], args.features, args.repeats),
    )
    merge_section(Path(args.out), "temporal_attention", {device.type: figures},
                  stale=lambda section: "sequence" in section)  # legacy flat layout: replaced
    for row in figures["sequence"]:
        print(f"L={row['length']:5d}  softmax {row['softmax_ms']:9.2f} ms  sdpa {row['sdpa_ms']:9.2f} ms  "
              f"favor {row['favor_ms']:8.2f} ms")
    for row in figures["streaming"]:
        print(f"history={row['history_frames']:5d}  MTA {row['mta_ms_per_clip']:7.2f} ms/clip "
              f"({row['mta_state_bytes']} B state)  full-history softmax "
              f"{row['full_history_softmax_ms_per_clip']:8.2f} ms/clip ({row['full_history_state_bytes']} B)")
    print(f"wrote {args.out} [temporal_attention.{device.type}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
