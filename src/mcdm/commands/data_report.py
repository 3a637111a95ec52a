"""`mcdm data-report`: merged rejects, contact sheet and the filters' precision / recall against the
planted defects (reports/data_pipeline.json); with ``--bench-videos N``, throughput of scenes + faces
on N videos with 1 vs 2 workers."""
from __future__ import annotations

from mcdm.commands.args import Arg, Command, optional, out, required
from mcdm.data.scoring import data_report


def run(params, args) -> None:
    data_report(stage_dirs=args.stages, kept_path=args.kept, out_dir=args.out, params=params,
                source=args.source or params.data.source, manifest=args.manifest, bench_videos=args.bench_videos)


COMMAND = Command(run, (
    Arg(("--stages",), "stage output folders in pipeline order (e.g. data/ingest data/scenes data/faces "
                       "data/quality data/sync)", {"nargs": "+", "required": True}),
    required("--kept", "the last data table whose clips are shown as kept (e.g. data/sync/kept.parquet)"),
    optional("--source", "raw video folder, for thumbnails of whole-file rejects (default: data.source)"),
    optional("--manifest", "ground truth of planted defects (e.g. data/sample/manifest.csv); skipped when absent"),
    Arg(("--bench-videos",), "measure scenes + faces throughput on this many videos with 1 and 2 workers (0: skip)",
        {"type": int, "default": 0}),
    out("reports folder (e.g. reports)"),
))
