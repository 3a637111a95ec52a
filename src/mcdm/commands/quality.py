"""`mcdm quality`: no-reference quality filter (classical by default, HyperIQA from a local file)."""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("quality", help="resolution / sharpness / exposure / blockiness filter (kept.parquet)")
    p.add_argument("--faces", required=True, help="faces' table (e.g. data/faces/faces.parquet)")
    p.add_argument("--out", required=True, help="output folder (e.g. data/quality)")
    p.add_argument("--workers", type=int, default=None, help="override data.workers for this run")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.data.quality import quality

    quality(args.faces, args.out, params, workers=args.workers)
    return 0
