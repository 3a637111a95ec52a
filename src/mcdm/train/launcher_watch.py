"""A rank started by DeepSpeed's launcher stops when the launcher is gone.

``deepspeed`` (the runner) starts ``python -m deepspeed.launcher.launch``, which starts the ranks. A
``kill -9`` of the runner (a scheduler's hard stop, or a user's) kills neither of them: the ranks
would train on, orphaned, next to the rerun that resumes the same checkpoint folder. So each
launched rank watches its launcher ancestors (the contiguous chain of parents whose command line
names deepspeed) and, when one of them disappears, prints one line and ends the job on its node
at once, like a ``kill -9`` of the whole job: SIGKILL to what is left of the launcher, to the
other ranks it started, then to itself. Every rank goes the same way whichever notices first (left
to ``launch.py``, the others would get a SIGTERM, which the CLI turns into an error: their MLflow
run would end FAILED instead of being marked KILLED by the run that resumes). The checkpoints are
written so that any moment is a safe one (:mod:`mcdm.train.checkpoints`).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import psutil

POLL_S = 1.0


def launcher_ancestors() -> list[psutil.Process]:
    """The parents of this process that belong to DeepSpeed's launcher, nearest first."""
    chain = []
    for parent in psutil.Process().parents():
        try:
            command = " ".join(parent.cmdline())
        except psutil.Error:
            break
        if "deepspeed" not in command:
            break
        chain.append(parent)
    return chain


def _gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _kill_job(chain: list[psutil.Process]) -> None:
    """SIGKILL the launcher processes still alive, the ranks the nearest one started, then this one."""
    me = os.getpid()
    try:
        ranks = [p for p in chain[0].children(recursive=True) if p.pid != me]
    except psutil.Error:
        ranks = []
    for process in [*chain, *ranks]:
        try:
            process.kill()  # psutil checks that the pid is still the process it was (no reused pid)
        except psutil.Error:
            pass
    os.kill(me, signal.SIGKILL)


def watch_launcher(rank: int, poll_s: float = POLL_S) -> list[int]:
    """Start the watch (a daemon thread) when launched; returns the pids watched."""
    chain = launcher_ancestors()
    if not chain:
        return []

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            gone = [p for p in chain if _gone(p)]
            if gone:
                sys.stderr.write(f"rank {rank}: the launcher (pid {gone[0].pid}) is gone: stopping this node's ranks\n")
                sys.stderr.flush()
                _kill_job(chain)

    threading.Thread(target=watch, name="mcdm-launcher-watch", daemon=True).start()
    return [p.pid for p in chain]
