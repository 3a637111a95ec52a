"""`mcdm token-figures`: the lip-token heatmap and the t-SNE of expression tokens (Figure 6)."""
from __future__ import annotations

from mcdm.commands.args import FEATURES, Command, required
from mcdm.eval.token_figures import token_figures


def run(params, args) -> None:
    summary = token_figures(args.features, args.motion_prior, args.motion_encoders, args.lip_heatmap, args.tsne,
                            args.tsne_csv, args.summary, params)
    lip, tsne = summary["lip_heatmap"], summary["tsne"]
    print(f"wrote {args.lip_heatmap}: lip tokens of {', '.join(lip['clips'])} "
          f"({'sampled and ground truth' if lip['sampled'] else 'ground truth only: ' + str(lip['not_sampled_reason'])})")
    print(f"wrote {args.tsne} and {args.tsne_csv}: {tsne['points']} expression tokens of {tsne['clips']} clips, "
          f"perplexity {tsne['perplexity']:g} ({summary['seconds']:.1f} s)")


COMMAND = Command(run, (
    FEATURES,
    required("--motion-prior", "the stage-2 present-clip motion prior (models/stage2/motion_prior)"),
    required("--motion-encoders", "the motion encoders folder (models/motion_encoders)"),
    required("--lip-heatmap", "output PNG: sampled vs ground-truth lip tokens over time"),
    required("--tsne", "output PNG: t-SNE of expression tokens"),
    required("--tsne-csv", "output CSV: the t-SNE coordinates (clip_id, split, identity, frame, x, y)"),
    required("--summary", "output JSON: clips, sizes and the perplexity used (read by the report)"),
))
