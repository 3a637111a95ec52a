"""`mcdm syncnet-train`: train SyncNet on the clips in and out of sync (or convert the official
weights given by ``data.syncnet.weights``)."""
from __future__ import annotations

from pathlib import Path

from mcdm.commands.args import Command, optional, out, required
from mcdm.media.files import write_json
from mcdm.train.syncnet import run_syncnet_train


def run(params, args) -> None:
    manifest = args.manifest
    if manifest is None and (Path(params.data.source) / "manifest.csv").is_file():
        manifest = str(Path(params.data.source) / "manifest.csv")
    m = run_syncnet_train(args.clips, args.out, params, manifest_path=manifest)
    if args.metrics:
        write_json(m, args.metrics)
    if m["backend"] == "syncnet_trained":
        print(f"syncnet_train: {m['steps']} steps in {m['train_seconds']:.0f} s on {m['train_clips']} clips "
              f"({m['planted_out_of_sync_in_train']} planted out-of-sync); held-out {m['heldout_clips']} clips: "
              f"pair AUC {m.get('heldout_pair_auc', float('nan')):.3f}, accuracy "
              f"{m.get('heldout_pair_accuracy', float('nan')):.3f}, offset found (|o|<=1) "
              f"{m.get('heldout_offset_within_1', float('nan')):.2f} -> {args.out}")
    else:
        print(f"syncnet_train: official weights {m['weights']} converted to {args.out}; {m['clips_scored']} clips scored")


COMMAND = Command(run, (
    required("--clips", "face-filtered clips table (data/quality/kept.parquet)"),
    out("model folder to write (models/syncnet)"),
    optional("--manifest", "sample ground truth, to count planted out-of-sync clips in the training data "
                           "(default: <data.source>/manifest.csv when it exists)"),
    optional("--metrics", "also write the metrics JSON here (e.g. reports/syncnet.json, a DVC metrics file)"),
))
