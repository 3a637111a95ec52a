"""`mcdm features`: per-clip latents, audio features, identity, landmarks, head pose, mouth crops."""
from __future__ import annotations

from mcdm.commands.args import Command, out, required
from mcdm.data.features import features


def run(params, args) -> None:
    features(args.split, args.models, args.out, params)


COMMAND = Command(run, (required("--split", "folder of train / test / open_set .parquet (e.g. data/split)"),
                        required("--models", "the base_models folder (e.g. models/base)"),
                        out("output folder (e.g. data/features)")))
