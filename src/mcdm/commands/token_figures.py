"""`mcdm token-figures`: the token_figures stage: the lip-token heatmap and the t-SNE of expression
tokens (paper Figure 6; DECISIONS #23).

Thin wrapper over :func:`mcdm.eval.token_figures.token_figures`: reads the stored features of the test
and open-set clips, samples lip tokens with the stage-2 motion prior beside the lip encoder's tokens of
the ground truth, embeds expression tokens with t-SNE, and writes the two pictures, the t-SNE
coordinates and a summary.
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("token-figures", help="lip-token heatmap and t-SNE of expression tokens (Figure 6)")
    p.add_argument("--features", required=True, help="features folder (index.parquet + <clip_id>.safetensors)")
    p.add_argument("--motion-prior", required=True, help="the stage-2 present-clip motion prior (models/stage2/motion_prior)")
    p.add_argument("--motion-encoders", required=True, help="the motion encoders folder (models/motion_encoders)")
    p.add_argument("--lip-heatmap", required=True, help="output PNG: sampled vs ground-truth lip tokens over time")
    p.add_argument("--tsne", required=True, help="output PNG: t-SNE of expression tokens")
    p.add_argument("--tsne-csv", required=True, help="output CSV: the t-SNE coordinates (clip_id, split, identity, frame, x, y)")
    p.add_argument("--summary", required=True, help="output JSON: clips, sizes and the perplexity used (read by the report)")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.eval.token_figures import token_figures

    summary = token_figures(args.features, args.motion_prior, args.motion_encoders, args.lip_heatmap, args.tsne,
                            args.tsne_csv, args.summary, params)
    lip, tsne = summary["lip_heatmap"], summary["tsne"]
    print(f"wrote {args.lip_heatmap}: lip tokens of {', '.join(lip['clips'])} "
          f"({'sampled and ground truth' if lip['sampled'] else 'ground truth only: ' + str(lip['not_sampled_reason'])})")
    print(f"wrote {args.tsne} and {args.tsne_csv}: {tsne['points']} expression tokens of {tsne['clips']} clips, "
          f"perplexity {tsne['perplexity']:g} ({summary['seconds']:.1f} s)")
    return 0
