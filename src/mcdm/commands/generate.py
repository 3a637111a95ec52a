"""`mcdm generate`: a portrait + speech (+ optional landmark video) -> a long talking-face mp4.

Thin wrapper over :class:`mcdm.pipelines.mcdm.MCDMPipeline`: checks the inputs (image readable,
audio decodes and is not empty), loads the checkpoint (default: this repo's ``models/`` folder, i.e. the
stage-3 output; or a pipeline folder, or ``models:/name@alias`` from the MLflow registry), refuses a
checkpoint of another variant than ``params.variant``, and streams the video clip by clip into
``--out`` with the audio muxed in and a progress bar in frames.
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a talking-face video from a portrait and speech")
    p.add_argument("--ref", required=True, help="reference portrait (png / jpg; the face is found and cropped)")
    p.add_argument("--audio", required=True, help="speech (wav / mp3 / flac / any video with audio), resampled to 16 kHz mono")
    p.add_argument("--out", required=True, help="output mp4 (H.264 + AAC, the input audio muxed in)")
    p.add_argument("--landmarks", default=None, help="optional driving video: its face landmarks and head pose guide the motion")
    p.add_argument("--seconds", type=float, default=None, help="generate only the first N seconds of the audio")
    p.add_argument("--checkpoint", default="models",
                   help="models/ folder of this repo's stages (default), a pipeline folder, or models:/name@alias")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per clip (default: eval.steps)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: params seed)")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from pathlib import Path

    import torch

    from mcdm.errors import McdmError
    from mcdm.pipelines.mcdm import MCDMPipeline
    from mcdm.pipelines.preprocessing import crop_portrait, read_image, read_speech

    if args.steps is not None and args.steps < 1:
        raise McdmError(f"--steps: must be >= 1 (got {args.steps})")
    if Path(args.out).suffix.lower() != ".mp4":
        raise McdmError(f"--out {args.out}: the output is an mp4 file (name it *.mp4)")
    # 1. cheap input checks first, each a one-line error naming the file
    image = read_image(args.ref)
    audio = read_speech(args.audio, params.data.audio_rate)
    # 2. the checkpoint, of the variant the params ask for
    pipe = MCDMPipeline.from_checkpoint(args.checkpoint, params)
    pipe.check_variant(params.variant)
    steps = args.steps or params.eval.steps
    seed = params.seed if args.seed is None else args.seed
    # 3. the face of the portrait, cropped as the checkpoint's training clips were
    portrait = crop_portrait(image, pipe.data_params, what=args.ref)
    if portrait.n_faces > 1:
        print(f"{args.ref}: {portrait.n_faces} faces found; using the most confident one")
    # 4. generate, streaming into the mp4
    out = pipe(portrait.image, audio, seconds=args.seconds, landmarks=args.landmarks, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), output_path=args.out, crop_face=False,
               ref_landmarks=portrait.landmarks)
    print(f"wrote {out.path}: {out.n_frames} frames ({out.n_frames / out.fps:.2f} s at {out.fps:g} fps, audio muxed), "
          f"variant {pipe.variant}, alpha {pipe.denoiser.config.alpha:g}, {steps} steps per clip")
    return 0
