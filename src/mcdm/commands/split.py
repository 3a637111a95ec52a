"""`mcdm split`: train / test / open-set tables, grouped by source identity."""
from __future__ import annotations

from mcdm.commands.args import Command, out, required
from mcdm.data.split import split


def run(params, args) -> None:
    split(args.clips, args.out, params)


COMMAND = Command(run, (required("--clips", "the filtered clips table (sync_filter's; e.g. data/sync/kept.parquet)"),
                        out("output folder (e.g. data/split)")))
