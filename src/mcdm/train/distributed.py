"""The process group a stage trains in: the launcher's ranks (``deepspeed --num_gpus N`` / a hostfile /
``--num_accelerators N`` on CPU), or, started directly, one rank of its own with a ``gloo`` group on CPU."""
from __future__ import annotations

import contextlib
import os
import socket

import torch

from mcdm.errors import McdmError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_env():
    """When no launcher started us, act as rank 0 of 1 while DeepSpeed sets up, then restore the
    environment (so processes we start later do not believe they were launched)."""
    if "RANK" in os.environ:
        missing = [k for k in LAUNCHER_VARS if k not in os.environ]
        if missing:
            raise McdmError(f"launched with RANK set but without {', '.join(missing)}")
        yield
        return
    saved = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def import_deepspeed():
    if not on_gpu():
        # choose DeepSpeed's CPU accelerator outright instead of letting it probe and warn
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not on_gpu():
        # gloo does the (rare) CPU collectives; without this DeepSpeed JIT-compiles its shared-memory
        # all-reduce op at start-up (minutes on 2 cores, and it needs a C++ toolchain)
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    return deepspeed


def init_distributed():
    """Start (once per process) the process group: gloo on CPU, the accelerator's backend on GPU."""
    deepspeed = import_deepspeed()
    import torch.distributed as dist

    if not dist.is_initialized():
        with single_process_env():
            deepspeed.init_distributed(dist_backend=None if on_gpu() else "gloo")
    return deepspeed


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
