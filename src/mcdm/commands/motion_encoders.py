"""`mcdm motion-encoders`: the motion_encoders stage (DECISIONS #3).

Thin wrapper over :func:`mcdm.train.motion_encoders.train_motion_encoders`: trains the lip encoder
(InfoNCE against audio windows, random-shift negatives) and the expression encoder (denoising
autoencoder on pose-normalised landmark offsets), fits the head-token statistics, and saves the frozen
encoders (diffusers folders, safetensors) + metrics.json under --out.
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("motion-encoders", help="train and freeze the lip / expression encoders and the head-token statistics")
    p.add_argument("--features", required=True, help="features folder (index.parquet + <clip_id>.safetensors)")
    p.add_argument("--out", required=True, help="output folder (head/, lip/, lip_audio/, expression/, metrics.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.train.motion_encoders import train_motion_encoders

    metrics = train_motion_encoders(args.features, args.out, params)

    def fmt(key: str) -> str:
        return "n/a (no held-out clip)" if metrics[key] is None else f"{metrics[key]:.2f}"

    print(
        f"wrote {args.out}: {metrics['n_clips']} clips; lip sync acc (val) {fmt('lip_sync_acc_val')} "
        f"(chance {metrics['lip_sync_acc_chance']:.2f}); expression R^2 (val) {fmt('expression_r2_val')}"
    )
    return 0
