"""Run a per-video function over many videos: in-process, on a Dask LocalCluster, or on a scheduler.

Every data stage maps one function over its videos or clips with :func:`map_videos` (decisions.md #9),
with :func:`stage_workers` deciding between processes and this process:

- ``workers == 1`` and no address: a plain loop in this process (no cluster to start);
- ``workers >= 2``: a ``dask.distributed.LocalCluster`` of ``workers`` single-threaded processes
  (started and stopped by the call: a few seconds, worth it on stages of minutes);
- ``address`` set (``data.dask_address``): the existing scheduler there (any machine count).

A tqdm bar counts finished items. One bad item never stops the map: an exception raised by ``fn``
for one item comes back as a :class:`Crashed` value in that item's slot (with its traceback printed
to stderr), which the stage records as a reject ``crashed: <error>`` instead of losing the file; an
item still running after ``timeout`` seconds (``data.item_timeout_seconds``: a file that makes a
decoder block) comes back as ``Crashed(code="timeout")``, recorded as a ``timeout`` reject, and the
map goes on (the stuck call is left in a daemon thread, which ends with the process).

On a cluster a worker may die mid-item (killed, out of memory, its machine lost): the scheduler
runs the item again on another worker. An item whose runs killed more workers than the scheduler
allows (``distributed.scheduler.allowed-failures``, 3 by default) comes back as
``Crashed("KilledWorker: ...")``: a reject, not a lost file (tests/test_data_dask_cluster.py).
"""
from __future__ import annotations

import logging
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm


@dataclass(frozen=True)
class Crashed:
    """``fn`` raised on one item (``reason``: ``"<ExceptionType>: <first line>"``, code ``crashed``) or
    gave no result within the timeout (code ``timeout``)."""

    reason: str
    code: str = "crashed"


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    try:
        return fn(item)
    except Exception as err:  # one bad item must not stop the stage: it becomes a reject row
        traceback.print_exc(file=sys.stderr)
        first = (str(err).splitlines() or [""])[0][:200]
        return Crashed(f"{type(err).__name__}: {first}")


def _guarded(fn: Callable[[Any], Any], item: Any, timeout: float | None = None) -> Any:
    """``fn(item)``, an exception as :class:`Crashed`; with ``timeout``, run in a daemon thread that is
    abandoned (a blocked C call cannot be interrupted) when it has not returned in time."""
    if timeout is None:
        return _call(fn, item)
    box: list[Any] = []
    worker = threading.Thread(target=lambda: box.append(_call(fn, item)), name="mcdm-item", daemon=True)
    worker.start()
    worker.join(timeout)
    if not box:
        return Crashed(f"no result after {timeout:g} s (data.item_timeout_seconds)", code="timeout")
    return box[0]


def stage_workers(workers: int, address: str | None, multithreaded: bool) -> int:
    """Worker processes for a stage on one machine (``data.workers``, ``data.dask_address``).

    A stage whose per-item work is already multi-threaded (cv2, torch: quality, sync_filter,
    features) runs in-process unless a scheduler address is given: LocalCluster workers that each
    import torch and load the models cost more than they gain on one machine. Measured on the
    embedded default, 2 idle cores, in-process vs 2 workers: quality 10 vs 15 s, sync_filter 24 vs
    35 s, features 47 vs 74 s; single-threaded work gains from processes (faces 135 vs 84 s).
    """
    if address:
        return workers
    return 1 if multithreaded else workers


def map_videos(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    workers: int = 1,
    address: str | None = None,
    desc: str = "videos",
    cost: Callable[[Any], float] | None = None,
    timeout: float | None = None,
) -> list[Any]:
    """``[fn(item) for item in items]`` in parallel, results in input order.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one). ``cost``
    (e.g. an item's duration) submits the most expensive items first so workers finish together;
    ``timeout``: seconds an item may take before it becomes ``Crashed(code="timeout")``.
    """
    items = list(items)
    if not items:
        return []
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else list(range(len(items)))
    results: list[Any] = [None] * len(items)
    if workers <= 1 and not address:
        bar = tqdm(total=len(items), desc=desc, unit="item", dynamic_ncols=True, file=sys.stderr)
        for i in order:
            results[i] = _guarded(fn, items[i], timeout)
            bar.update(1)
        bar.close()
        return results

    from dask.distributed import Client, LocalCluster, as_completed
    from distributed import KilledWorker

    cluster = None
    if address:
        client = Client(address)
    else:
        cluster = LocalCluster(
            n_workers=min(workers, len(items)),
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",  # a free local port: never a fixed one on a shared machine
            silence_logs=logging.WARNING,
        )
        client = Client(cluster)
    bar = tqdm(total=len(items), desc=desc, unit="item", dynamic_ncols=True, file=sys.stderr)
    try:
        run = uuid.uuid4().hex[:8]  # keys unique even on a long-lived shared scheduler
        futures = [client.submit(_guarded, fn, items[i], timeout, key=f"{desc}-{run}-{i}") for i in order]
        index = {fut.key: i for fut, i in zip(futures, order)}
        for fut in as_completed(futures):
            try:
                results[index[fut.key]] = fut.result()
            except KilledWorker as err:  # the item took down every worker that ran it
                print(f"{desc}: item {index[fut.key]}: {err}", file=sys.stderr)
                results[index[fut.key]] = Crashed(f"KilledWorker: a worker died running it "
                                                  f"{err.allowed_failures + 1} times")
            bar.update(1)
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
    return results
