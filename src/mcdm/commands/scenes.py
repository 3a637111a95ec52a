"""`mcdm scenes`: cut the ingested videos at scene changes into normalised clips of <= 30 s."""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("scenes", help="PySceneDetect cuts -> 25 fps / 16 kHz mono clips (clips.parquet, cuts.parquet)")
    p.add_argument("--videos", required=True, help="ingest's table (e.g. data/ingest/videos.parquet)")
    p.add_argument("--out", required=True, help="output folder (e.g. data/scenes)")
    p.add_argument("--workers", type=int, default=None, help="override data.workers for this run")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.data.scenes import scenes

    scenes(args.videos, args.out, params, workers=args.workers)
    return 0
