"""`mcdm generate`: a portrait + speech (+ optional landmark video) -> a long talking-face mp4 at the
portrait's resolution; or every row of a ``--batch`` file with the model loaded once.

Runs from any folder: the checkpoint (a bundle or pipeline folder, or ``models:/name@alias`` from the
MLflow registry at ``MLFLOW_TRACKING_URI``) carries the params it was trained with; only this repo's
``models/`` folder (the default) reads ``params.yaml``. Inputs are checked before the model loads;
the video is written clip by clip with a progress bar (``--stream``: a fragmented MP4 that plays while
it grows). ``--params`` given: the checkpoint must be of its variant.
"""
from __future__ import annotations

import logging
from pathlib import Path

from mcdm.commands.args import Command, optional, positive_seconds, switch
from mcdm.config import load_params
from mcdm.config.generation import GenerationSettings
from mcdm.errors import McdmError
from mcdm.pipelines.batch import read_batch, run_batch
from mcdm.pipelines.device import place, placement
from mcdm.pipelines.loading import load_pipeline, needs_params
from mcdm.pipelines.video import check_output, generate_video, read_inputs
from mcdm.tracking.registry import resolve_checkpoint

log = logging.getLogger(__name__)


def lufs(text: str):
    """``--lufs``: a target loudness (LUFS, <= 0) or ``off``."""
    if text.strip().lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        raise McdmError(f"--lufs {text}: a loudness in LUFS (e.g. -23) or off") from None
    if not value <= 0:
        raise McdmError(f"--lufs {text}: loudness is <= 0 LUFS")
    return value


def settings_of(args) -> GenerationSettings:
    """The defaults of :class:`GenerationSettings` with the options given."""
    given = {"device": args.device, "dtype": args.dtype, "silence_detector": args.silence_detector}
    values = {k: v for k, v in given.items() if v is not None}
    if args.lufs is not None:
        values["loudness_lufs"] = lufs(args.lufs)
    values.update({k: True for k in ("crop_only", "trim_silence") if getattr(args, k)})
    return GenerationSettings(**values)


def run(_, args) -> int:
    if args.steps is not None and args.steps < 1:
        raise McdmError(f"--steps: must be >= 1 (got {args.steps})")
    single = [f"--{k}" for k in ("ref", "audio", "out") if getattr(args, k) is None]
    if args.batch is None and single:
        raise McdmError(f"{', '.join(single)}: required (or --batch FILE)")
    if args.batch is not None and len(single) < 3:
        raise McdmError("--batch: the pairs come from the file; leave out --ref, --audio and --out")
    settings = settings_of(args)
    where = placement(settings.device, settings.dtype)
    params = load_params(args.params) if args.params else None
    # 1. cheap input checks first, each a one-line error naming the file (only the audio used is decoded)
    rows = read_batch(args.batch) if args.batch else None
    if rows is None:
        check_output(args.out)
        read_inputs(args.ref, args.audio, seconds=args.seconds, settings=settings)
    # 2. the checkpoint (its own params unless it is a models/ folder), on the device asked for
    folder = resolve_checkpoint(args.checkpoint)
    if params is None and needs_params(folder) and Path(folder).is_dir():
        params = load_params("params.yaml")
    pipe = load_pipeline(folder, params)
    pipe.register_to_config(provenance={**pipe.config.provenance, "source": str(args.checkpoint)})
    if params is not None:
        pipe.check_variant(params.variant)
    place(pipe, where)
    seed = args.seed if args.seed is not None else (params.seed if params else int(pipe.config.provenance.get("seed", 0)))
    model = (f"variant {pipe.variant}, alpha {pipe.denoiser.config.alpha:g}, "
             f"{args.steps or pipe.config.default_steps} steps per clip, on {where.describe()}")

    def one(ref, audio, out, seconds, row_seed, steps):
        result = generate_video(pipe, ref, audio, out, settings=settings, seconds=seconds, steps=steps or args.steps,
                                seed=row_seed, stream=args.stream, landmarks=args.landmarks)
        log.info(result.speech.line())
        if result.n_faces > 1:
            log.warning(f"{ref}: {result.n_faces} faces found; used the most confident one")
        return result

    if rows is None:
        print(f"{one(args.ref, args.audio, args.out, args.seconds, seed, args.steps).line()}; {model}")
        return 0
    log.info(f"{args.checkpoint}: {model}")
    results = run_batch(rows, lambda r: one(r.portrait, r.audio, r.out, r.seconds or args.seconds,
                                            seed if r.seed is None else r.seed, r.steps))
    failed = [r for r in results if not r.ok]
    print(f"batch {args.batch}: {len(results) - len(failed)} of {len(results)} videos written"
          + (f"; failed: rows {', '.join(str(r.row.number) for r in failed)}" if failed else ""))
    return 1 if failed else 0


COMMAND = Command(run, (
    optional("--ref", "reference portrait (png / jpg; the face is found, and the video has its resolution)"),
    optional("--audio", "speech (wav / mp3 / flac / any video with audio), resampled to 16 kHz mono"),
    optional("--out", "output mp4 (H.264 + AAC, the input audio muxed in)"),
    optional("--batch", "CSV or YAML file of rows portrait, audio, out[, seconds, seed, steps] (paths relative to "
                        "it): every row generated with the model loaded once; a failing row is reported, the rest run"),
    optional("--landmarks", "optional driving video: its face landmarks and head pose guide the motion"),
    optional("--seconds", "generate only the first N seconds of the audio", type=positive_seconds),
    optional("--checkpoint", "models/ folder of this repo's stages (default; reads params.yaml), a bundle or pipeline "
                             "folder, or models:/name@alias (MLflow registry at MLFLOW_TRACKING_URI)", default="models"),
    optional("--steps", "denoising steps per clip (default: the checkpoint's eval.steps)", type=int),
    optional("--seed", "noise seed (default: the checkpoint's seed)", type=int),
    optional("--device", "auto (CUDA when present), cpu, cuda or cuda:N (default: auto)"),
    optional("--dtype", "auto (half precision on CUDA, float32 on CPU), float32, float16, bfloat16",
             choices=("auto", "float32", "float16", "bfloat16")),
    switch("--crop-only", "write the model's face crop only (research), not the face pasted into the portrait"),
    switch("--stream", "write a fragmented MP4 that plays while it is generated; report time to first frame and "
                       "the real-time factor"),
    optional("--lufs", "loudness target of the speech before its features, LUFS (default -23), or off"),
    switch("--trim-silence", "cut leading and trailing silence before generating (else only reported)"),
    optional("--silence-detector", "energy (default) or silero (voice activity model shipped in its package)",
             choices=("energy", "silero")),
), needs_params=False, params_file_optional=True)
