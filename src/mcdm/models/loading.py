"""Strict loading of saved models: every weight of the config is found, nothing is left over."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mcdm.errors import McdmError


# =============================================================================================
# Loading helper
# =============================================================================================
def load_strict(cls, path: str | Path, **kwargs):
    """``cls.from_pretrained(path)`` that fails (one line) when a weight is missing or unexpected; only
    safetensors weights are read (a pickled ``.bin`` would run code on load)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise McdmError(f"{path}: no config.json (not a saved {cls.__name__})")
    if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise McdmError(f"{path}: only pickled .bin weights (they can run code when loaded); mcdm reads safetensors")
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, use_safetensors=True, **kwargs)
    except (ValueError, OSError, RuntimeError) as err:
        raise McdmError(f"{path}: cannot load {cls.__name__}: {str(err).splitlines()[0]}") from None
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise McdmError(f"{path}: {cls.__name__} weights do not match its config: {bad or info['error_msgs']}")
    return model.eval()


def load_transformers_folder(cls, path: str | Path, key: str, device: str | torch.device = "cpu"):
    """A ``transformers`` model of a local ``save_pretrained`` folder (safetensors weights only: a pickled
    ``.bin`` is refused) and the folder's ``preprocessor_config.json`` (``{}`` when absent); ``key`` is the
    param that gave the path, named in the one-line error."""
    path = Path(path)
    if not path.is_dir():
        raise McdmError(f"{key}: {path} is not a folder")
    try:
        model = cls.from_pretrained(str(path), use_safetensors=True).to(device)
    except (OSError, ValueError) as err:
        raise McdmError(f"{path}: cannot load {cls.__name__} ({str(err).splitlines()[0][:160]}; weights must be "
                        "safetensors)") from None
    pre = path / "preprocessor_config.json"
    return model, json.loads(pre.read_text()) if pre.exists() else {}
