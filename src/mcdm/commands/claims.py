"""`mcdm claims`: the paper's claims (Tables 3-5, Figures 5 and 7) answered with effects, confidence
intervals, sample sizes and verdicts, from the main line's and the members' evaluations."""
from __future__ import annotations

from mcdm.commands.args import Command, required
from mcdm.eval.claims_report import verdict_counts, write_claims


def run(params, args) -> None:
    result = write_claims(args.main, args.members, params, args.out)
    counts = verdict_counts(result)
    print(f"wrote {args.out}/claims.md and claims.json: {len(result['claims'])} claims, {counts['supported']} supported, "
          f"{counts['refuted']} refuted, {counts['inconclusive']} inconclusive")
    for item in result["missing"]:
        print(f"  missing: {item}")


COMMAND = Command(run, (
    required("--main", "the main line's evaluation folder (evaluate's --out: metrics_details.json, eval_clips.csv, "
                       "features.npz)"),
    required("--members", "folder of the matrix members' evaluation folders (<member>/metrics_details.json, ...)"),
    required("--out", "folder claims.md, claims.json and the interval pictures go to"),
))
