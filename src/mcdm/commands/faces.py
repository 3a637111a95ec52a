"""`mcdm faces`: one-face check, smoothed square talking-head crops and 68 landmarks per frame."""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("faces", help="face detection + crops at data.resolution + landmarks (faces.parquet)")
    p.add_argument("--clips", required=True, help="scenes' table (e.g. data/scenes/clips.parquet)")
    p.add_argument("--out", required=True, help="output folder (e.g. data/faces)")
    p.add_argument("--workers", type=int, default=None, help="override data.workers for this run")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.data.faces import faces

    faces(args.clips, args.out, params, workers=args.workers)
    return 0
