"""DeepSpeed checkpoints are loaded with ``torch.load(weights_only=True)``: resuming runs no pickled code.

DeepSpeed's own ``TorchCheckpointEngine`` loads every checkpoint file (module states, ZeRO optimizer
partitions) with ``weights_only=False``: a crafted ``mp_rank_00_model_states.pt`` in a checkpoint
folder would run its payload when the stage resumes. After ``deepspeed.initialize``,
:func:`load_safely` gives the engine :class:`SafeTorchCheckpointEngine` instead: the same files and
saving, but loading unpickles only tensors, plain containers and the few DeepSpeed classes its
checkpoints hold (:data:`ALLOWED`, checked against freshly saved checkpoints by
``tests/test_engine_security.py``, so a DeepSpeed upgrade that pickles a new class fails there
first). Anything else stops the stage with one line naming the file (:class:`UnsafeCheckpoint`).
"""
from __future__ import annotations

import functools
import pickle

import torch

from mcdm.errors import McdmError


class UnsafeCheckpoint(McdmError):
    """A checkpoint file holds objects other than tensors and DeepSpeed's allowed classes."""


def allowed_globals() -> list:
    """The classes DeepSpeed 0.19's ZeRO-1/2 checkpoints pickle besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def allowed_names() -> set[str]:
    """``module.qualname`` of :func:`allowed_globals` (as ``get_unsafe_globals_in_checkpoint`` names them)."""
    return {f"{c.__module__}.{c.__qualname__}" for c in allowed_globals()}


def _reason(err: Exception) -> str:
    """The unpickler's own complaint (e.g. ``Unsupported global: GLOBAL posix.system ...``), one line."""
    text = str(err)
    named = [line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line]
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = named or [line.strip() for line in detail.splitlines() if line.strip()] or [type(err).__name__]
    return lines[0][:200]


@functools.lru_cache(maxsize=1)
def engine_class():
    """:class:`SafeTorchCheckpointEngine` (made on first use: DeepSpeed is imported after its accelerator is chosen)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed_globals()):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except pickle.UnpicklingError as err:
                    raise UnsafeCheckpoint(f"{path}: refusing to load it: it holds more than tensors and "
                                           f"DeepSpeed's own state ({_reason(err)})") from None

    return SafeTorchCheckpointEngine


def load_safely(engine) -> None:
    """Swap the engine's torch checkpoint engine for the safe one (other engines are left alone:
    they call ``torch.load`` without ``weights_only``, which is ``True`` by default since torch 2.6)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = engine_class()(engine._config)
