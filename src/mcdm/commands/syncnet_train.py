"""`mcdm syncnet-train`: train the SyncNet used by the sync filter and the Sync-C / Sync-D metrics.

Thin wrapper over :func:`mcdm.train.syncnet.run_syncnet_train`. With ``data.syncnet.weights`` set (the
official ``syncnet_v2.model``, a local path) nothing is trained: the weights are converted into the
same ``save_pretrained`` folder and checked on the clips.
"""
from __future__ import annotations

from pathlib import Path

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("syncnet-train", help="train SyncNet on the face-filtered clips (in-sync vs shifted audio)")
    p.add_argument("--clips", required=True, help="face-filtered clips table (data/quality/kept.parquet)")
    p.add_argument("--out", required=True, help="model folder to write (models/syncnet)")
    p.add_argument("--manifest", default=None,
                   help="sample ground truth, to count planted out-of-sync clips in the training data "
                        "(default: <data.source>/manifest.csv when it exists)")
    p.add_argument("--metrics", default=None,
                   help="also write the metrics JSON here (e.g. reports/syncnet.json, a DVC metrics file)")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.train.syncnet import run_syncnet_train

    manifest = args.manifest
    if manifest is None and (Path(params.data.source) / "manifest.csv").is_file():
        manifest = str(Path(params.data.source) / "manifest.csv")
    m = run_syncnet_train(args.clips, args.out, params, manifest_path=manifest)
    if args.metrics:
        from mcdm.data.rejects import write_json

        write_json(m, args.metrics)
    if m["backend"] == "syncnet_trained":
        print(f"syncnet_train: {m['steps']} steps in {m['train_seconds']:.0f} s on {m['train_clips']} clips "
              f"({m['planted_out_of_sync_in_train']} planted out-of-sync); held-out {m['heldout_clips']} clips: "
              f"pair AUC {m.get('heldout_pair_auc', float('nan')):.3f}, accuracy "
              f"{m.get('heldout_pair_accuracy', float('nan')):.3f}, offset found (|o|<=1) "
              f"{m.get('heldout_offset_within_1', float('nan')):.2f} -> {args.out}")
    else:
        print(f"syncnet_train: official weights {m['weights']} converted to {args.out}; "
              f"{m['clips_scored']} clips scored")
    return 0
