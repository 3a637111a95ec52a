"""`mcdm report`: the ablation tables, the alpha sweep table and report.md from the pipeline's reports."""
from __future__ import annotations

from mcdm.commands.args import Arg, Command, optional, required
from mcdm.eval.report import write_report


def run(params, args) -> None:
    done = write_report(params, args.metrics, args.members, args.train, args.data, args.out, args.long_term,
                        open_set=args.open_set, token_figures=args.token_figures, claims=args.claims,
                        syncnet=args.syncnet)
    print(f"wrote {args.out}/report.md and the tables: {done['members']} matrix members read")
    for item in done["missing"]:
        print(f"  missing: {item}")
    for item in done["ignored"]:
        print(f"  ignored (not in the current matrix): {item}")


COMMAND = Command(run, (
    required("--metrics", "the main line's full metrics (evaluate's metrics_details.json)"),
    required("--members", "folder of the matrix members' reports (<member>/metrics_details.json)"),
    Arg(("--train",), "the main line's training reports (train_stage1.json ...)", {"nargs": "+", "default": []}),
    required("--data", "the data stages' report (data_pipeline.json)"),
    optional("--long-term", "the main line's long-term curve picture (long_term.png), linked from report.md"),
    optional("--open-set", "the open_set stage's summary (open_set.json): the open-set table"),
    optional("--token-figures", "the token_figures stage's summary (token_figures.json): the lip-token heatmap "
                                "and the t-SNE of expression tokens, linked from report.md"),
    optional("--claims", "the claims stage's answers (claims.json): verdicts, intervals, the tables' intervals"),
    optional("--syncnet", "syncnet_train's metrics (models/syncnet/metrics.json): its folds and planted clips"),
    required("--out", "reports folder the tables and report.md go to"),
))
