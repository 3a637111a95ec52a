"""Export of what a stage trained: diffusers ``save_pretrained`` folders (safetensors + config.json)
with the fp32 master weights, written by rank 0 to ``<out>.tmp`` and renamed."""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from mcdm.train.distributed import barrier


def _fp32_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights with trainable parameters taken from the optimizer's fp32 master copy
    (a collective under ZeRO: every rank must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
             for k, v in module.state_dict().items()}
    for name, p in module.named_parameters():
        if p.requires_grad:
            master = safe_get_full_fp32_param(p)
            if master is not None:
                state[name] = master.detach().float().cpu().reshape(p.shape)
    return state


def export_pretrained(modules, out_dir: str | Path, *, rank: int = 0, fp32_master: bool = True) -> Path:
    """Write a diffusers ``save_pretrained`` folder (safetensors + config.json), or one subfolder per
    entry of a mapping, to ``<out>.tmp`` and rename it to ``out``. Call on every rank; rank 0 writes.

    With ``fp32_master`` the trainable weights come from DeepSpeed's fp32 master copy, so a bf16
    run exports full-precision weights."""
    out = Path(out_dir)
    items = modules.items() if isinstance(modules, Mapping) else [("", modules)]
    states = [(sub, m, _fp32_state_dict(m) if fp32_master else None) for sub, m in items]
    if rank != 0:
        barrier()
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub, module, state in states:
        target = tmp / sub if sub else tmp
        to_save = module
        if state is not None and any(v.dtype != state[k].dtype for k, v in module.state_dict().items()):
            to_save = type(module).from_config(module.config)
            to_save.load_state_dict(state, strict=True)
        to_save.save_pretrained(target, safe_serialization=True)
    old = out.with_name(out.name + ".old.tmp")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    barrier()
    return out
