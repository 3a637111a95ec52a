"""`mcdm motion-encoders`: train and freeze the lip and expression encoders and the head-token statistics."""
from __future__ import annotations

from mcdm.commands.args import FEATURES, Command, out
from mcdm.train.motion_encoders import train_motion_encoders


def run(params, args) -> None:
    metrics = train_motion_encoders(args.features, args.out, params)

    def fmt(key: str) -> str:
        return "n/a (no held-out clip)" if metrics[key] is None else f"{metrics[key]:.2f}"

    print(f"wrote {args.out}: {metrics['n_clips']} clips; lip sync acc (val) {fmt('lip_sync_acc_val')} "
          f"(chance {metrics['lip_sync_acc_chance']:.2f}); expression R^2 (val) {fmt('expression_r2_val')}")


COMMAND = Command(run, (FEATURES, out("output folder (head/, lip/, lip_audio/, expression/, metrics.json)")))
