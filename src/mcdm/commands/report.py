"""`mcdm report`: the report stage (DECISIONS #23), the last stage of dvc.yaml.

Thin wrapper over :func:`mcdm.eval.report.write_report`: reads the main line's metrics, the matrix
members' metrics, the training and data reports, the open-set and token-figure summaries, and writes
ablations.csv/.md, alpha_sweep.csv/.png, long_term_variants.png and report.md. Missing inputs are listed in report.md, not invented.
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("report", help="ablation tables, alpha sweep and report.md from the pipeline's reports")
    p.add_argument("--metrics", required=True, help="the main line's metrics.json (evaluate)")
    p.add_argument("--members", required=True, help="folder of the matrix members' reports (<member>/metrics.json)")
    p.add_argument("--train", nargs="+", default=[], help="the main line's training reports (train_stage1.json ...)")
    p.add_argument("--data", required=True, help="the data stages' report (data_pipeline.json)")
    p.add_argument("--long-term", help="the main line's long-term curve picture (long_term.png), linked from report.md")
    p.add_argument("--open-set", help="the open_set stage's summary (open_set.json): the open-set table")
    p.add_argument("--token-figures", help="the token_figures stage's summary (token_figures.json): the lip-token "
                   "heatmap and the t-SNE of expression tokens, linked from report.md")
    p.add_argument("--out", required=True, help="reports folder the tables, pictures and report.md go to")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.eval.report import write_report

    done = write_report(params, args.metrics, args.members, args.train, args.data, args.out, args.long_term,
                        open_set=args.open_set, token_figures=args.token_figures)
    print(f"wrote {args.out}/report.md and the tables: {done['members']} matrix members read")
    for item in done["missing"]:
        print(f"  missing: {item}")
    for item in done["ignored"]:
        print(f"  ignored (not in the current matrix): {item}")
    return 0
