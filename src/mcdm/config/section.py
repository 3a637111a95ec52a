"""The base of every params section: unknown keys are errors, assignments are validated, types strict."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Variant = Literal["full", "wo_fa", "wo_fpc", "wo_mta", "b1", "b2"]
VARIANTS: tuple[str, ...] = ("full", "wo_fa", "wo_fpc", "wo_mta", "b1", "b2")


class Section(BaseModel):
    """Strict: no type coercion (``seed: '3'`` or ``steps: 2.0`` is an error, an int where a float is
    wanted is fine), numbers finite (``fps: .inf`` is an error), no unknown key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)
