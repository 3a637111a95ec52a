"""`mcdm sync-filter`: score every clip with SyncNet and drop the out-of-sync ones."""
from __future__ import annotations

from mcdm.commands.args import Command, out, required
from mcdm.data.sync_filter import sync_filter
from mcdm.media.files import read_table


def run(params, args) -> None:
    sync_filter(read_table(args.clips, "quality"), args.model, params, args.out)


COMMAND = Command(run, (required("--clips", "face-filtered clips table (data/quality/kept.parquet)"),
                        required("--model", "SyncNet folder written by syncnet-train (models/syncnet)"),
                        out("output folder (data/sync)")))
