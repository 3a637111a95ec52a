"""`mcdm sample-data`: write talkingface-wild-mini (the embedded stand-in for TalkingFace-Wild / HDTF).

Thin wrapper over :func:`mcdm.data.sample.generator.generate_sample`; ``--n-videos``, ``--seconds``
and ``--seed`` override the ``sample`` section of params.yaml for one run.
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser(
        "sample-data",
        help="generate the embedded sample dataset (speech in 10 languages, animated portraits, planted defects)",
    )
    p.add_argument("--out", default="data/sample", help="output folder (default: data/sample)")
    p.add_argument("--n-videos", type=int, default=None, help="override sample.n_videos (long videos come on top)")
    p.add_argument("--n-long", type=int, default=None, help="override sample.n_long")
    p.add_argument("--seconds", type=float, default=None,
                   help="scale every duration by this factor (1 = params; e.g. 4 for longer videos)")
    p.add_argument("--seed", type=int, default=None, help="override sample.seed")
    p.add_argument("--workers", type=int, default=None, help="Dask worker processes rendering videos (default: data.workers)")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from pydantic import ValidationError

    from mcdm.config import SampleParams
    from mcdm.data.sample.generator import generate_sample
    from mcdm.errors import McdmError

    overrides = {"n_videos": args.n_videos, "n_long": args.n_long, "seed": args.seed, "time_scale": args.seconds}
    try:
        sample = SampleParams.model_validate(
            {**params.sample.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as err:
        first = err.errors()[0]
        raise McdmError(f"sample.{first['loc'][0]}: {first['msg']} (got {first.get('input')!r})") from None
    manifest = generate_sample(args.out, sample, workers=args.workers or params.data.workers,
                               dask_address=params.data.dask_address)
    counts = manifest["kind"].value_counts().to_dict()
    print(f"wrote {len(manifest)} files to {args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0
