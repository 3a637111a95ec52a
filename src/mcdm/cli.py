"""`mcdm <command>`: one subcommand per DVC stage, plus `params` and `generate`.

Each command lives in its own module of :mod:`mcdm.commands` as ``COMMAND`` (its arguments and its
``run(params, args)``). This file lists them, in pipeline order, with their one-line help, and imports
only the module of the command being run: ``mcdm --help`` and ``mcdm params check`` start in well
under a second instead of loading torch, diffusers and MLflow (the only ``importlib`` dispatch in the
package; tests/test_architecture.py allows it here and nowhere else). Expected failures (bad params,
bad input, a stage run out of order) raise ``McdmError`` / ``ParamsError`` and print as one line.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from typing import Optional

from mcdm.config import ParamsError, load_params
from mcdm.errors import McdmError
from mcdm.logs import LEVELS, configure

# name -> (module under mcdm.commands, one-line help), in pipeline order
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("params", "apply a params profile (default | micro | paper | quality), show or check params.yaml"),
    "sample-data": ("sample_data", "generate the embedded sample dataset (speech in 10 languages, animated "
                                   "portraits, planted defects)"),
    "ingest": ("ingest", "probe every file of the source folder: videos.parquet + rejects.csv"),
    "scenes": ("scenes", "PySceneDetect cuts -> 25 fps / 16 kHz mono clips (clips.parquet, cuts.parquet)"),
    "faces": ("faces", "face detection + crops at data.resolution + landmarks (faces.parquet)"),
    "quality": ("quality", "resolution / sharpness / exposure / blockiness filter (kept.parquet)"),
    "syncnet-train": ("syncnet_train", "train SyncNet on the face-filtered clips (in-sync vs shifted audio), in two "
                                       "folds (the metric one trains on the training split only)"),
    "sync-filter": ("sync_filter", "score every clip with SyncNet and drop out-of-sync ones"),
    "split": ("split", "train.parquet / test.parquet / open_set.parquet (9:1 by source group)"),
    "data-report": ("data_report", "merged rejects, contact sheet and filter scores (reports/data_pipeline.json)"),
    "base-models": ("base_models", "load the paper's base weights, or pretrain the tiny VAE + UNet on the training crops"),
    "features": ("features", "per-clip latents, audio features, identity, landmarks, head pose, mouth crops"),
    "motion-encoders": ("motion_encoders", "train and freeze the lip / expression encoders and the head-token statistics"),
    "train": ("train", "train one MCDM stage (1: archived-clip prior, 2: present-clip prior, 3: present-clip "
                       "attention + MTA)"),
    "evaluate": ("evaluate", "generate the test clips, metrics vs baselines, long-term curve and windows"),
    "open-set": ("open_set", "open-set table: unseen portraits x held-out audio (Sync-C/D, identity, FID)"),
    "token-figures": ("token_figures", "lip-token heatmap and t-SNE of expression tokens (Figure 6)"),
    "ablate": ("ablate", "one ablation / alpha-sweep member: retrain its stages, evaluate it"),
    "claims": ("claims", "the paper's claims answered: effects, 95% intervals, n, supported / refuted / inconclusive"),
    "report": ("report", "ablation tables, alpha sweep and report.md from the pipeline's reports"),
    "generate": ("generate", "generate a talking-face video from a portrait and speech (or a batch of pairs)"),
    "demo": ("demo", "the web demo (Gradio) on 127.0.0.1: portrait + speech in, video out"),
}


def _command_of(argv: list[str]) -> Optional[str]:
    """The command named in ``argv`` (the first word that is one), or None."""
    return next((word for word in argv if word in COMMANDS), None)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; ``command``'s module is imported and its arguments added (the others list only
    their help)."""
    parser = argparse.ArgumentParser(
        prog="mcdm",
        description="MCDM long-term talking-face pipeline: each subcommand is a DVC stage (see dvc.yaml).",
    )
    parser.add_argument("--params", default=None, help="params file to validate and read (default: params.yaml; "
                                                       "generate: the checkpoint's own)")
    parser.add_argument("--log-level", default="info", choices=LEVELS, help="messages shown on stderr (default: info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, (module, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        if name == command:
            spec = importlib.import_module(f"mcdm.commands.{module}").COMMAND
            spec.register(p)
            p.set_defaults(spec=spec)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every atomic writer removes its temporary file."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    configure(args.log_level)
    if args.params is None and not args.spec.params_file_optional:
        args.params = "params.yaml"
    in_main = threading.current_thread() is threading.main_thread()  # signals can only be set there
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        params = load_params(args.params) if args.spec.needs_params else None
        return int(args.spec.run(params, args) or 0)
    except (McdmError, ParamsError) as err:
        print(f"mcdm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"mcdm {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"mcdm {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
