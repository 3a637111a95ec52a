"""`mcdm <command>`: one subcommand per DVC stage, plus `params` and `generate`.

Each command lives in its own module as ``register(subparsers)``, which adds a parser whose
``func(args) -> int`` does the work; this file only lists them. Expected failures (bad params, bad
input, a stage run out of order) raise ``McdmError`` / ``ParamsError`` and print as one line.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from mcdm.errors import McdmError

# (command module, in pipeline order). Each module exposes ``register(subparsers)``.
COMMAND_MODULES = [
    "mcdm.commands.params",
    "mcdm.commands.sample_data",
    "mcdm.commands.ingest",
    "mcdm.commands.scenes",
    "mcdm.commands.faces",
    "mcdm.commands.quality",
    "mcdm.commands.syncnet_train",
    "mcdm.commands.sync_filter",
    "mcdm.commands.split",
    "mcdm.commands.data_report",
    "mcdm.commands.motion_encoders",
    "mcdm.commands.train",
    "mcdm.commands.base_models",
    "mcdm.commands.features",
    "mcdm.commands.evaluate",
    "mcdm.commands.open_set",
    "mcdm.commands.token_figures",
    "mcdm.commands.ablate",
    "mcdm.commands.report",
    "mcdm.commands.generate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcdm",
        description="MCDM long-term talking-face pipeline: each subcommand is a DVC stage (see dvc.yaml).",
    )
    parser.add_argument("--params", default="params.yaml", help="params file to validate and read (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mcdm.config import ParamsError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (McdmError, ParamsError) as err:
        print(f"mcdm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mcdm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
