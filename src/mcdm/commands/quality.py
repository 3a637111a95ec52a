"""`mcdm quality`: resolution / sharpness / exposure / blockiness filter (kept.parquet)."""
from __future__ import annotations

from mcdm.commands.args import WORKERS, Command, out, required
from mcdm.data.quality import quality


def run(params, args) -> None:
    quality(args.faces, args.out, params, workers=args.workers)


COMMAND = Command(run, (required("--faces", "faces' table (e.g. data/faces/faces.parquet)"),
                        out("output folder (e.g. data/quality)"), WORKERS))
