"""``reports/benchmarks.json``: the benchmark scripts' figures, one section per benchmark and one key
per device or setting inside it, merged so that each script leaves the others' sections alone."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

from mcdm.errors import McdmError


def merge_section(path: str | Path, section: str, entries: Mapping[str, Any], *,
                  stale: Optional[Callable[[dict], bool]] = None) -> None:
    """Set ``data[section][key] = value`` for each of ``entries`` in the JSON file ``path``
    (write-then-rename; the section's other keys and the file's other sections are kept). A section
    that is not a mapping, or that ``stale(section)`` calls an old layout, is replaced."""
    path = Path(path)
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text() or "{}")
        except json.JSONDecodeError as err:
            raise McdmError(f"{path}: not valid JSON ({err.msg}); fix or remove it") from None
    current = data.get(section)
    if not isinstance(current, dict) or (stale is not None and stale(current)):
        current = {}
    current.update(entries)
    data[section] = current
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
