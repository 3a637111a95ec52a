"""`mcdm features`: the features stage (DECISIONS #3).

Thin wrapper over :func:`mcdm.data.features.features`: per clip of the train / test / open-set tables,
decode the crop once and store VAE latents, per-frame audio features, the reference identity
embedding, landmarks, head pose, expression offsets, mouth crops and the face crops in
``<out>/<clip_id>.safetensors``, plus ``index.parquet`` and ``meta.json``.
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("features", help="per-clip latents, audio features, identity, landmarks, head pose, mouth crops")
    p.add_argument("--split", required=True, help="folder of train.parquet / test.parquet / open_set.parquet (e.g. data/split)")
    p.add_argument("--models", required=True, help="the base_models folder (e.g. models/base)")
    p.add_argument("--out", required=True, help="output folder (e.g. data/features)")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.data.features import features

    features(args.split, args.models, args.out, params)
    return 0
