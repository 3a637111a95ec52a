"""Many portrait + speech pairs with the model loaded once: ``mcdm generate --batch rows.csv``.

A batch file is CSV (a header row) or YAML (a list of mappings, or ``rows:`` holding one) with the
columns ``portrait``, ``audio``, ``out`` and optionally ``seconds``, ``seed``, ``steps``; relative paths
are relative to the batch file's folder. A file that cannot be read, or lacks a column, stops the batch
with one line; a row that fails (a missing file, no face, a bad number, ...) is reported with its
reason and the other rows still run.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from mcdm.errors import McdmError

log = logging.getLogger(__name__)

REQUIRED = ("portrait", "audio", "out")
OPTIONAL = ("seconds", "seed", "steps")


@dataclass
class BatchRow:
    number: int  # 1-based, as a user counts the rows (the CSV header not counted)
    portrait: Optional[Path] = None
    audio: Optional[Path] = None
    out: Optional[Path] = None
    seconds: Optional[float] = None
    seed: Optional[int] = None
    steps: Optional[int] = None
    error: Optional[str] = None  # why the row cannot run, found while reading it


@dataclass
class RowResult:
    row: BatchRow
    ok: bool
    message: str  # the result line, or the reason it failed
    details: dict = field(default_factory=dict)


def _number(value: Any, name: str, kind: type):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = kind(float(value)) if kind is int and not isinstance(value, bool) else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: not a number ({value!r})") from None
    if kind is int and float(value) != number:
        raise ValueError(f"{name}: not a whole number ({value!r})")
    if kind is float and (not math.isfinite(number) or number <= 0):
        raise ValueError(f"{name}: must be a finite number > 0 (got {value!r})")
    if name == "steps" and number < 1:
        raise ValueError(f"steps: must be >= 1 (got {value!r})")
    return number


def _row(number: int, raw: dict, base: Path) -> BatchRow:
    row = BatchRow(number)
    try:
        missing = [k for k in REQUIRED if not str(raw.get(k) or "").strip()]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        row.portrait, row.audio, row.out = (base / os.path.expanduser(str(raw[k]).strip()) for k in REQUIRED)
        row.seconds = _number(raw.get("seconds"), "seconds", float)
        row.seed = _number(raw.get("seed"), "seed", int)
        row.steps = _number(raw.get("steps"), "steps", int)
    except ValueError as err:
        row.error = str(err)
    return row


def read_batch(path: str | os.PathLike) -> list[BatchRow]:
    """The rows of a CSV or YAML batch file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise McdmError(f"--batch {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
            records = data.get("rows") if isinstance(data, dict) else data
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise McdmError(f"--batch {path}: a YAML batch is a list of mappings (or rows: [...])")
            columns = {k for r in records for k in r}
        elif path.suffix.lower() == ".csv":
            reader = csv.DictReader(text.splitlines())
            records = list(reader)
            columns = set(reader.fieldnames or [])
        else:
            raise McdmError(f"--batch {path}: a batch file is .csv or .yaml")
    except (UnicodeDecodeError, yaml.YAMLError, csv.Error) as err:
        raise McdmError(f"--batch {path}: cannot read it ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    unknown = columns - set(REQUIRED) - set(OPTIONAL)
    if unknown:
        raise McdmError(f"--batch {path}: unknown column(s) {', '.join(sorted(map(str, unknown)))} "
                        f"(columns: {', '.join(REQUIRED + OPTIONAL)})")
    missing = [k for k in REQUIRED if k not in columns]
    if missing or not records:
        raise McdmError(f"--batch {path}: " + (f"no column {', '.join(missing)}" if records else "no rows"))
    return [_row(i, r, path.parent) for i, r in enumerate(records, 1)]


def run_batch(rows: list[BatchRow], generate: Callable[[BatchRow], Any]) -> list[RowResult]:
    """``generate(row)`` for every row; a row's :class:`McdmError` (or an unreadable value) is its result,
    and the next row runs."""
    results = []
    for row in rows:
        label = f"row {row.number}"
        if row.error:
            results.append(RowResult(row, False, f"{label}: error: {row.error}"))
        else:
            try:
                done = generate(row)
                results.append(RowResult(row, True, f"{label}: {done.line()}", done.as_dict()))
            except McdmError as err:
                results.append(RowResult(row, False, f"{label} ({row.portrait.name}, {row.audio.name}): error: {err}"))
        (log.info if results[-1].ok else log.error)(results[-1].message)
    return results
