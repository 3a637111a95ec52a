"""`mcdm faces`: one-face check, smoothed square talking-head crops and 68 landmarks per frame."""
from __future__ import annotations

from mcdm.commands.args import WORKERS, Command, out, required
from mcdm.data.faces import faces


def run(params, args) -> None:
    faces(args.clips, args.out, params, workers=args.workers)


COMMAND = Command(run, (required("--clips", "scenes' table (e.g. data/scenes/clips.parquet)"),
                        out("output folder (e.g. data/faces)"), WORKERS))
