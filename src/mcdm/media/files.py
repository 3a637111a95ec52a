"""Atomic writes: every output is written to a temporary name beside it and renamed when complete,
so a killed stage never leaves a half-written file that DVC could cache, and a failure or an
interrupt (Ctrl-C, SIGTERM turned into an exception by the CLI) removes the temporary file.

``atomic_path`` / ``atomic_dir`` are the mechanism; the ``write_*`` helpers are the common cases.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from mcdm.errors import MissingStageOutput


def temp_name(path: str | os.PathLike) -> Path:
    """The hidden temporary name of ``path``: ``.<stem>.tmp<pid><suffix>`` in the same folder (same
    file system, so the rename is atomic; the suffix kept so writers that infer a format still can)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for ``path``; rename it over ``path`` when the block ends normally,
    remove it when the block raises (any exception, ``KeyboardInterrupt`` and ``SystemExit`` included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """The folder variant: yield an empty ``<path>.tmp`` folder; on success the old ``path`` (if any)
    is replaced by it, on failure it is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(obj: Mapping[str, Any] | Sequence[Any], path: str | os.PathLike, *, strict: bool = False) -> Path:
    """Indented JSON. ``strict``: NaN / inf are refused (standard JSON) instead of written as ``NaN``."""
    text = json.dumps(obj, indent=2, allow_nan=not strict, default=_json_default)
    return write_text(text + "\n", path)


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_csv(table: pd.DataFrame | Iterable[Mapping[str, Any]], path: str | os.PathLike,
              columns: Optional[Sequence[str]] = None) -> Path:
    """A DataFrame, or rows of dicts (``columns``: the header when there are no rows), as CSV without the index."""
    if isinstance(table, pd.DataFrame):
        df = table
    else:
        rows = list(table)
        df = pd.DataFrame(rows, columns=list(columns) if columns is not None and not rows else None)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        df.reset_index(drop=True).to_parquet(tmp, index=False)
    return Path(path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100, close: bool = True) -> Path:
    """A matplotlib figure as PNG (closed afterwards unless ``close`` is False)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        if close:
            plt.close(fig)
    return Path(path)


def remove_partial(path: str | os.PathLike) -> None:
    """Remove ``path`` and any temporary file of it that a killed writer left beside it."""
    path = Path(path)
    path.unlink(missing_ok=True)
    for tmp in path.parent.glob(f".{path.stem}.tmp*"):
        tmp.unlink(missing_ok=True)


def read_table(path: str | os.PathLike, made_by: str) -> pd.DataFrame:
    """A stage's input table; a one-line error naming the stage to run when it is missing."""
    path = Path(path)
    if not path.exists():
        raise MissingStageOutput(path, made_by)
    return pd.read_parquet(path)


def jsonable(value):
    """``value`` with numpy scalars as Python numbers and NaN / inf as None (standard JSON)."""
    import math

    import numpy as np

    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
