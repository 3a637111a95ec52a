"""What every ``mcdm`` command is made of: its arguments (the ones several commands share are defined
once, here) and a ``run(params, args)`` over a library function; :mod:`mcdm.cli` loads the command's
module only when that command runs, so ``mcdm params check`` does not import torch."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from mcdm.config import Params


@dataclass(frozen=True)
class Arg:
    """One ``parser.add_argument(*flags, help=help, **options)``."""

    flags: tuple[str, ...]
    help: str
    options: dict[str, Any] = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*self.flags, help=self.help, **self.options)


def required(flag: str, help: str, **options) -> Arg:
    """A path (or value) the command cannot run without; DVC stages give every path this way."""
    return Arg((flag,), help, {"required": True, **options})


def optional(flag: str, help: str, **options) -> Arg:
    return Arg((flag,), help, {"default": None, **options})


def switch(flag: str, help: str) -> Arg:
    return Arg((flag,), help, {"action": "store_true"})


@dataclass(frozen=True)
class Command:
    """A command: its arguments and ``run(params, args) -> exit code`` (None counts as 0). Commands
    that read no params set ``needs_params=False`` and get None; ``add_arguments`` replaces ``args``
    for a command with sub-commands of its own. ``params_file_optional``: ``args.params`` stays None
    unless ``--params`` is given (``mcdm generate`` reads the checkpoint's own params)."""

    run: Callable[[Optional[Params], argparse.Namespace], Optional[int]]
    args: tuple[Arg, ...] = ()
    needs_params: bool = True
    params_file_optional: bool = False
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None

    def register(self, parser: argparse.ArgumentParser) -> None:
        if self.add_arguments is not None:
            self.add_arguments(parser)
        for arg in self.args:
            arg.add_to(parser)


# --------------------------------------------------------------------------------- shared arguments
FEATURES = required("--features", "features folder (index.parquet, meta.json, <clip_id>.safetensors; e.g. data/features)")
MODELS = required("--models", "models folder of the main line (base/, motion_encoders/, stage1-3/; e.g. models)")
SYNCNET = required("--syncnet", "SyncNet folder for Sync-C / Sync-D (e.g. models/syncnet)")
WORKERS = optional("--workers", "override data.workers for this run", type=int)
NO_TRACKING = switch("--no-tracking", "do not log to MLflow nor touch the registry")
QUIET = switch("--quiet", "no progress bars")


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0 (checked before anything heavy loads)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (got {text})")
    return value


def out(help: str) -> Arg:
    return required("--out", help)


def fmt(value, digits: int = 4) -> str:
    """A number for a one-line summary: ``n/a`` for a missing one."""
    return "n/a" if value is None else f"{value:.{digits}g}"
