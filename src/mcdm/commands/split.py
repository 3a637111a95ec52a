"""`mcdm split`: deterministic train / test / open-set tables by source group."""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("split", help="train.parquet / test.parquet / open_set.parquet (9:1 by source group)")
    p.add_argument("--clips", required=True, help="the filtered clips table (sync_filter's) (e.g. data/sync/kept.parquet)")
    p.add_argument("--out", required=True, help="output folder (e.g. data/split)")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.data.split import split

    split(args.clips, args.out, params)
    return 0
