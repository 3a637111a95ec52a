"""Seeds, deterministic algorithms and the RNG states a checkpoint carries (so a killed-and-resumed
run ends bitwise equal to an uninterrupted one on CPU)."""
from __future__ import annotations

import base64
import contextlib
import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mcdm.train.distributed import on_gpu


def set_determinism(deterministic: bool) -> None:
    if not deterministic:
        torch.use_deterministic_algorithms(False)
        return
    if on_gpu():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    # warn_only: an op without a deterministic kernel warns instead of killing a long run
    torch.use_deterministic_algorithms(True, warn_only=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, as JSON."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(state), gauss],
           "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
           "torch": b64(torch.get_rng_state())}
    if on_gpu():
        out["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, st, gauss = state["python"]
    random.setstate((version, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(unb64(state["torch"]))
    if "cuda" in state and on_gpu():
        torch.cuda.set_rng_state_all([unb64(s) for s in state["cuda"]])


@contextlib.contextmanager
def preserved_rng():
    """Run a side task (sampling a preview) without moving the training RNG streams."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
