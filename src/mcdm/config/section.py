"""The base of every params section: unknown keys are errors, assignments are validated."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Variant = Literal["full", "wo_fa", "wo_fpc", "wo_mta", "b1", "b2"]
VARIANTS: tuple[str, ...] = ("full", "wo_fa", "wo_fpc", "wo_mta", "b1", "b2")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
