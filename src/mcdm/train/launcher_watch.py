"""A rank started by DeepSpeed's launcher stops when the launcher is gone.

``deepspeed`` (the runner) starts ``python -m deepspeed.launcher.launch``, which starts the ranks. A
``kill -9`` of the runner (a scheduler's hard stop, or a user's) kills neither of them: the ranks
would train on, orphaned, next to the rerun that resumes the same checkpoint folder. So each
launched rank watches its launcher ancestors (the contiguous chain of parents whose command line
names deepspeed) and, when one of them disappears, prints one line and exits at once, like a
``kill -9`` of the whole job: the checkpoints are written so that any moment is a safe one
(:mod:`mcdm.train.checkpoints`). ``launch.py`` then stops the other ranks on its node.
"""
from __future__ import annotations

import os
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


def watch_launcher(rank: int, poll_s: float = POLL_S) -> list[int]:
    """Start the watch (a daemon thread) when launched; returns the pids watched."""
    chain = launcher_ancestors()
    if not chain:
        return []

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            for process in chain:
                if _gone(process):
                    sys.stderr.write(f"rank {rank}: the launcher (pid {process.pid}) is gone: stopping\n")
                    sys.stderr.flush()
                    os._exit(1)

    threading.Thread(target=watch, name="mcdm-launcher-watch", daemon=True).start()
    return [p.pid for p in chain]
