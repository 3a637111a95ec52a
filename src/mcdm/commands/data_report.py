"""`mcdm data-report`: merge the data stages' rejects, draw the contact sheet, score the filters.

Writes ``<out>/data_rejects.csv`` (every stage's rejects, with a ``code`` column),
``<out>/data_contact_sheet.png`` (kept clips and rejects per reason) and ``<out>/data_pipeline.json``
(per-stage summaries; with ``--manifest``, precision / recall of every filter against the planted
defects; with ``--bench-videos N``, throughput of scenes + faces on N videos with 1 vs 2 workers).
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("data-report", help="merged rejects, contact sheet and filter scores (reports/data_pipeline.json)")
    p.add_argument("--stages", nargs="+", required=True,
                   help="stage output folders in pipeline order (e.g. data/ingest data/scenes data/faces data/quality data/sync)")
    p.add_argument("--kept", required=True, help="the last data table whose clips are shown as kept (e.g. data/quality/kept.parquet)")
    p.add_argument("--source", default=None, help="raw video folder, for thumbnails of whole-file rejects (default: data.source)")
    p.add_argument("--manifest", default=None, help="ground truth of planted defects (e.g. data/sample/manifest.csv); skipped when absent")
    p.add_argument("--bench-videos", type=int, default=0, help="measure scenes + faces throughput on this many videos with 1 and 2 workers (0: skip)")
    p.add_argument("--out", required=True, help="reports folder (e.g. reports)")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.data.scoring import data_report

    data_report(
        stage_dirs=args.stages,
        kept_path=args.kept,
        out_dir=args.out,
        params=params,
        source=args.source or params.data.source,
        manifest=args.manifest,
        bench_videos=args.bench_videos,
    )
    return 0
