"""`mcdm sample-data`: the embedded sample dataset talkingface-wild-mini (speech in 10 languages,
animated real portraits, planted defects, a manifest of the truth)."""
from __future__ import annotations

from pydantic import ValidationError

from mcdm.commands.args import Command, optional
from mcdm.config import SampleParams
from mcdm.data.sample.generator import generate_sample
from mcdm.errors import McdmError


def run(params, args) -> None:
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


COMMAND = Command(run, (
    optional("--out", "output folder (default: data/sample)", default="data/sample"),
    optional("--n-videos", "override sample.n_videos (long videos come on top)", type=int),
    optional("--n-long", "override sample.n_long", type=int),
    optional("--seconds", "scale every duration by this factor (1 = params; e.g. 4 for longer videos)", type=float),
    optional("--seed", "override sample.seed", type=int),
    optional("--workers", "Dask worker processes rendering videos (default: data.workers)", type=int),
))
