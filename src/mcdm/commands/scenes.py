"""`mcdm scenes`: PySceneDetect cuts -> clips at data.fps with 16 kHz mono audio."""
from __future__ import annotations

from mcdm.commands.args import WORKERS, Command, out, required
from mcdm.data.scenes import scenes


def run(params, args) -> None:
    scenes(args.videos, args.out, params, workers=args.workers)


COMMAND = Command(run, (required("--videos", "ingest's table (e.g. data/ingest/videos.parquet)"),
                        out("output folder (e.g. data/scenes)"), WORKERS))
