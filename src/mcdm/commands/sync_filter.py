"""`mcdm sync-filter`: drop clips whose audio and lips are out of sync (AV offset / Sync-C cut).

Thin wrapper over :func:`mcdm.data.sync_filter.sync_filter`.
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("sync-filter", help="score every clip with SyncNet and drop out-of-sync ones")
    p.add_argument("--clips", required=True, help="face-filtered clips table (data/quality/kept.parquet)")
    p.add_argument("--model", required=True, help="SyncNet folder written by syncnet-train (models/syncnet)")
    p.add_argument("--out", required=True, help="output folder (data/sync)")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.data.rejects import read_table
    from mcdm.data.sync_filter import sync_filter

    clips = read_table(args.clips, "quality")
    sync_filter(clips, args.model, params, args.out)
    return 0
