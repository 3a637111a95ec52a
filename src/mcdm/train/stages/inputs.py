"""Where a training stage reads from (paths come from dvc.yaml through the CLI) and the outputs of earlier stages."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mcdm.errors import McdmError, MissingStageOutput
from mcdm.media.layout import STAGE_JSON
from mcdm.models.loading import load_strict


def stage_name(stage: int) -> str:
    return f"train_stage{stage}"


@dataclass
class StageInputs:
    """Where a stage reads from (paths come from dvc.yaml through the CLI)."""

    features: Path
    base: Optional[Path] = None
    motion_encoders: Optional[Path] = None
    prev: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        self.features = Path(self.features)
        self.base = Path(self.base) if self.base is not None else None
        self.motion_encoders = Path(self.motion_encoders) if self.motion_encoders is not None else None
        self.prev = tuple(Path(p) for p in self.prev)


def read_stage_json(folder: Path) -> dict:
    return json.loads((Path(folder) / STAGE_JSON).read_text())


def previous_output(inputs: StageInputs, stage: int) -> tuple[Path, dict]:
    """The folder (among ``--prev``) that stage ``stage`` exported, and its ``stage.json``."""
    for folder in inputs.prev:
        path = folder / STAGE_JSON
        if path.is_file() and read_stage_json(folder).get("stage") == stage:
            return folder, read_stage_json(folder)
    for folder in inputs.prev:  # named like that stage's output but not (completely) there
        if re.search(rf"stage_?{stage}\b", folder.name) and not (folder / STAGE_JSON).is_file():
            raise MissingStageOutput(folder / STAGE_JSON, stage_name(stage))
    given = ", ".join(str(p) for p in inputs.prev) or "none"
    raise McdmError(f"no stage-{stage} output among --prev ({given}): run `dvc repro {stage_name(stage)}` "
                    f"first and pass its folder with --prev")


def component(folder: Path, name: str, cls, stage: int):
    path = folder / name
    if not (path / "config.json").is_file():
        raise MissingStageOutput(path, stage_name(stage))
    return load_strict(cls, path).requires_grad_(False)


def require(path: Optional[Path], what: str, stage: str) -> Path:
    if path is None:
        raise McdmError(f"{what}: required for this stage (give its folder)")
    if not Path(path).exists():
        raise MissingStageOutput(path, stage)
    return Path(path)


def file_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
