"""`mcdm generate`: a portrait + speech (+ optional landmark video) -> a long talking-face mp4.

Checks the inputs first (image readable, audio decodes and is not empty), loads the checkpoint (this
repo's ``models/`` folder by default; a bundle or pipeline folder; or ``models:/name@alias`` from the
MLflow registry), refuses a checkpoint of another variant than ``params.variant``, and streams the
video clip by clip into ``--out`` with the audio muxed in and a progress bar in frames.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mcdm.commands.args import Command, optional, out, positive_seconds, required
from mcdm.errors import McdmError
from mcdm.pipelines.loading import load_pipeline
from mcdm.pipelines.preprocessing import crop_portrait, read_image, read_speech
from mcdm.pipelines.video import generate_video
from mcdm.tracking.registry import resolve_checkpoint


def check_output(path: str) -> Path:
    """``--out``: an mp4 file name in a writable folder, checked before anything is generated."""
    out = Path(path)
    if out.is_dir():
        raise McdmError(f"--out {path}: is a folder, not a file name")
    if out.suffix.lower() != ".mp4":
        raise McdmError(f"--out {path}: the output is an mp4 file (name it *.mp4)")
    folder = out.parent
    if not folder.is_dir():
        raise McdmError(f"--out {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise McdmError(f"--out {path}: the folder {folder} is not writable")
    return out


def run(params, args) -> None:
    if args.steps is not None and args.steps < 1:
        raise McdmError(f"--steps: must be >= 1 (got {args.steps})")
    check_output(args.out)
    # 1. cheap input checks first, each a one-line error naming the file (only the audio used is decoded)
    image = read_image(args.ref)
    audio = read_speech(args.audio, params.data.audio_rate, seconds=args.seconds)
    # 2. the checkpoint, of the variant the params ask for
    pipe = load_pipeline(resolve_checkpoint(args.checkpoint), params)
    pipe.register_to_config(provenance={**pipe.config.provenance, "source": str(args.checkpoint)})
    pipe.check_variant(params.variant)
    steps = args.steps or params.eval.steps
    seed = params.seed if args.seed is None else args.seed
    # 3. the face of the portrait, cropped as the checkpoint's training clips were
    portrait = crop_portrait(image, pipe.data_params, what=args.ref)
    if portrait.n_faces > 1:
        print(f"{args.ref}: {portrait.n_faces} faces found; using the most confident one")
    # 4. generate, streaming into the mp4
    result = generate_video(pipe, portrait.image, audio, args.out, seconds=args.seconds, landmarks=args.landmarks,
                            num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                            crop_face=False, ref_landmarks=portrait.landmarks)
    print(f"wrote {result.path}: {result.n_frames} frames ({result.n_frames / result.fps:.2f} s at {result.fps:g} fps, "
          f"audio muxed), variant {pipe.variant}, alpha {pipe.denoiser.config.alpha:g}, {steps} steps per clip")


COMMAND = Command(run, (
    required("--ref", "reference portrait (png / jpg; the face is found and cropped)"),
    required("--audio", "speech (wav / mp3 / flac / any video with audio), resampled to 16 kHz mono"),
    out("output mp4 (H.264 + AAC, the input audio muxed in)"),
    optional("--landmarks", "optional driving video: its face landmarks and head pose guide the motion"),
    optional("--seconds", "generate only the first N seconds of the audio", type=positive_seconds),
    optional("--checkpoint", "models/ folder of this repo's stages (default), a bundle or pipeline folder, "
                             "or models:/name@alias", default="models"),
    optional("--steps", "denoising steps per clip (default: eval.steps)", type=int),
    optional("--seed", "noise seed (default: params seed)", type=int),
))
