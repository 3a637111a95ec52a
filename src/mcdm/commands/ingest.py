"""`mcdm ingest`: list the raw videos of a folder, keep the usable ones (data/ingest/videos.parquet)."""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("ingest", help="probe every file of the source folder: videos.parquet + rejects.csv")
    p.add_argument("--source", default=None, help="folder of raw videos (default: data.source from params)")
    p.add_argument("--out", required=True, help="output folder (e.g. data/ingest)")
    p.add_argument("--workers", type=int, default=None, help="override data.workers for this run")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.data.ingest import ingest

    ingest(args.source or params.data.source, args.out, params, workers=args.workers)
    return 0
