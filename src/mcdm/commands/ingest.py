"""`mcdm ingest`: probe every file of the source folder (videos.parquet + rejects.csv)."""
from __future__ import annotations

from mcdm.commands.args import WORKERS, Command, optional, out
from mcdm.data.ingest import ingest


def run(params, args) -> None:
    ingest(args.source or params.data.source, args.out, params, workers=args.workers)


COMMAND = Command(run, (optional("--source", "folder of raw videos (default: data.source from params)"),
                        out("output folder (e.g. data/ingest)"), WORKERS))
