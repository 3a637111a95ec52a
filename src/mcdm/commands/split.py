"""`mcdm split`: train / test / open-set tables, grouped by source identity."""
from __future__ import annotations

from mcdm.commands.args import Command, optional, out, required
from mcdm.data.split import split


def run(params, args) -> None:
    split(args.clips, args.out, params, candidates_path=args.candidates)


COMMAND = Command(run, (required("--clips", "the filtered clips table (sync_filter's; e.g. data/sync/kept.parquet)"),
                        optional("--candidates", "the clips before the sync filter (e.g. data/quality/kept.parquet): "
                                                 "the groups' roles are decided on them, as syncnet_train decides them"),
                        out("output folder (e.g. data/split)")))
