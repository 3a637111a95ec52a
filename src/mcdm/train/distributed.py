"""The process group a stage trains in: the launcher's ranks (``deepspeed --num_gpus N`` / a hostfile /
``--num_accelerators N`` on CPU), or, started directly, one rank of its own.

Nothing listens on a network interface it does not need:

* **one process**: the group's store is an in-memory ``HashStore`` (no TCP store at all) and gloo's
  own sockets are bound to the loopback interface (``GLOO_SOCKET_IFNAME=lo`` unless set);
* **launched ranks**: rank 0 listens for the group's store on ``MASTER_ADDR:MASTER_PORT`` only, the
  address the launcher gives (``127.0.0.1`` on one node; the first host's address, or
  ``--master_addr``, across nodes), not on every interface as ``env://`` would; on a loopback
  master gloo / NCCL stay on the loopback interface too. Each launched rank also stops when its
  launcher is killed (:mod:`mcdm.train.launcher_watch`).
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import socket

import torch

from mcdm.errors import McdmError
from mcdm.train.launcher_watch import watch_launcher

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what DeepSpeed asserts even for one process


def on_gpu() -> bool:
    return torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    return "RANK" in os.environ


@contextlib.contextmanager
def single_process_env():
    """When no launcher started us, act as rank 0 of 1 while DeepSpeed sets up, then restore the
    environment (so processes we start later do not believe they were launched). No MASTER_* is
    set: the one-process group has no TCP store."""
    if launched():
        missing = [k for k in LAUNCHER_VARS if k not in os.environ]
        if missing:
            raise McdmError(f"launched with RANK set but without {', '.join(missing)}")
        yield
        return
    saved = {k: os.environ.get(k) for k in RANK_VARS}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
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


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
                   for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (OSError, ValueError):
        return False


def _stay_on_loopback() -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def launcher_store(rank: int, world_size: int, timeout):
    """The group's TCP store at ``MASTER_ADDR:MASTER_PORT``: rank 0 binds its listening socket to
    that address only and hands it to the store; the other ranks connect."""
    import torch.distributed as dist

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen()
    except OSError as err:
        raise McdmError(f"rank 0 cannot listen on MASTER_ADDR:MASTER_PORT {addr}:{port} ({err}); "
                        "another run may hold the port: give the launcher another --master_port") from None
    return dist.TCPStore(addr, port, world_size, is_master=True, timeout=timeout, master_listen_fd=sock.detach())


def init_distributed():
    """Start (once per process) the process group: gloo on CPU, the accelerator's backend on GPU."""
    deepspeed = import_deepspeed()
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout

    if not dist.is_initialized():
        if on_gpu():
            from deepspeed.accelerator import get_accelerator

            backend = get_accelerator().communication_backend_name()
        else:
            backend = "gloo"
        by_launcher = launched()
        with single_process_env():
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            if by_launcher and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                store = None  # torchrun: its agent already serves the store on MASTER_PORT (env://)
            elif by_launcher:
                if is_loopback(os.environ["MASTER_ADDR"]):
                    _stay_on_loopback()
                store = launcher_store(rank, world_size, default_pg_timeout)
                watch_launcher(rank)
            else:
                _stay_on_loopback()
                store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=default_pg_timeout)
            deepspeed.init_distributed(dist_backend=backend)  # adopts the group
    return deepspeed


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
