"""The data stages on a Dask cluster started apart from them, as on a real cluster: ``dask scheduler``
and two ``dask worker`` processes (each with its nanny) on loopback, and ``data.dask_address``
pointing at the scheduler.

ingest, scenes, faces and features write the tables the in-process run writes, with every reject
and its reason; a worker process killed (SIGKILL) mid-``faces`` is survived (its nanny restarts it,
the scheduler runs the item again elsewhere: nothing lost); an item that kills every worker running
it ends as a ``KilledWorker`` reject instead of stopping the stage (``mcdm.data.parallel``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from conftest import ROOT, TINY_TRAINING, free_port, stop_session, tiny, tool_env
from safetensors.torch import load_file
from test_data_ingest_scenes import moving, other_scene, portrait, speech, synth_talking, synth_video, tiny_params

from mcdm.data.faces import faces
from mcdm.data.features import features
from mcdm.data.ingest import ingest
from mcdm.data.parallel import Crashed, map_videos
from mcdm.data.scenes import scenes
from mcdm.train.synthetic import write_base

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the scheduler's settings (as a user sets them in ~/.config/dask or the environment): a task is
# retried after one worker death and refused after two; a worker holds only the task it runs, so a
# file that kills it takes no queued file down with it
SCHEDULER_ENV = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1",
                 "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0"}
ALLOWED_FAILURES = int(SCHEDULER_ENV["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"])
TABLES = {"ingest": "videos.parquet", "scenes": "clips.parquet", "faces": "faces.parquet", "features": "index.parquet"}


class Cluster:
    """``dask scheduler`` + ``dask worker`` processes we started (each in its own session, stopped by its pid)."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        env = tool_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **SCHEDULER_ENV)
        # the workers import the stages' functions (and this module's) like any user's workers
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
        self.procs: list[subprocess.Popen] = []
        self._start(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
                    root / "scheduler.log", env)
        for name in ("w0", "w1"):
            self._start(["dask", "worker", self.address, "--name", name, "--nthreads", "1", "--host", "127.0.0.1",
                         "--no-dashboard", "--local-directory", str(root / name)], root / f"{name}.log", env)
        self.nannies = {p.pid for p in self.procs[1:]}

    def _start(self, cmd: list[str], log: Path, env: dict) -> None:
        with log.open("w") as fh:
            self.procs.append(subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def client(self):
        from dask.distributed import Client

        return Client(self.address, timeout="60s")

    def wait_for_workers(self, n: int = 2, timeout: float = 180) -> None:
        with self.client() as client:
            client.wait_for_workers(n, timeout=timeout)

    def stop(self) -> None:
        """Workers first (their nannies stop their worker processes), then the scheduler."""
        for proc in [*self.procs[1:], self.procs[0]]:
            stop_session(proc, timeout=15)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = Cluster(tmp_path_factory.mktemp("dask_cluster"))
    try:
        started.wait_for_workers()
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Talking heads, one video of a face then a cup (a scene cut, then no face), and broken files."""
    src = tmp_path_factory.mktemp("raw")
    for i in range(4):
        synth_talking(src / f"talk{i}.mp4", 1.6 + 0.2 * i)
    frames = [*moving(portrait(), 35), *moving(other_scene(), 35)]
    synth_video(src / "face then cup.mp4", frames, 25, speech(2.8), 16000)
    (src / "notes.txt").write_text("not a video")
    (src / "fake.mp4").write_bytes(os.urandom(2048))
    synth_video(src / "no_audio.mp4", moving(portrait(), 40), 25, None)
    return src


def run_stages(source: Path, out: Path, base: Path, address: str | None = None, during_faces=None) -> Path:
    p = tiny_params(min_clip_seconds=1.0)
    p.data.dask_address = address
    p.data.workers = 2 if address else 1
    p.base_models.threads = 1
    ingest(source, out / "ingest", p)
    scenes(out / "ingest" / TABLES["ingest"], out / "scenes", p)
    if during_faces is None:
        faces(out / "scenes" / TABLES["scenes"], out / "faces", p)
    else:
        errors: list[BaseException] = []

        def stage() -> None:
            try:
                faces(out / "scenes" / TABLES["scenes"], out / "faces", p)
            except BaseException as err:  # noqa: BLE001 -- re-raised in the test's thread
                errors.append(err)

        thread = threading.Thread(target=stage)
        thread.start()
        during_faces(thread)
        thread.join()
        if errors:
            raise errors[0]
    kept = pd.read_parquet(out / "faces" / TABLES["faces"])
    (out / "split").mkdir()
    kept.iloc[:-1].to_parquet(out / "split" / "train.parquet")
    kept.iloc[-1:].to_parquet(out / "split" / "test.parquet")
    kept.iloc[:0].to_parquet(out / "split" / "open_set.parquet")
    features(out / "split", base, out / "features", p)
    return out


def _table(path: Path, root: Path) -> pd.DataFrame:
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return df.map(lambda v: v.replace(str(root), "<out>") if isinstance(v, str) else v)


def kill_a_busy_worker(cluster: Cluster, thread: threading.Thread) -> dict:
    """SIGKILL the worker process that is running a faces item (never its nanny, never a process
    we did not start); returns what was killed."""
    with cluster.client() as client:
        while thread.is_alive():
            busy = {w: keys for w, keys in client.processing().items() if any(str(k).startswith("faces-") for k in keys)}
            if busy:
                address, keys = next(iter(busy.items()))
                pid = client.run(os.getpid, workers=[address])[address]
                worker = psutil.Process(pid)
                assert worker.parent().pid in cluster.nannies, (pid, worker.parent().pid)
                worker.send_signal(signal.SIGKILL)
                return {"address": address, "keys": [str(k) for k in keys], "pid": pid}
            time.sleep(0.01)
    raise AssertionError("faces finished before any worker was seen running an item")


def test_data_stages_on_a_separately_started_cluster_match_the_in_process_run(source, cluster, tmp_path):
    base = write_base(tmp_path / "base", tiny(TINY_TRAINING), res=32, latent=4)
    local = run_stages(source, tmp_path / "local", base)
    killed: dict = {}
    remote = run_stages(source, tmp_path / "cluster", base, cluster.address,
                        during_faces=lambda thread: killed.update(kill_a_busy_worker(cluster, thread)))
    # the item the killed worker was running ran again on a worker and has its ordinary outcome
    index = int(killed["keys"][0].rsplit("-", 1)[1])
    clip = pd.read_parquet(remote / "scenes" / TABLES["scenes"]).iloc[index]["clip_id"]
    kept = pd.read_parquet(remote / "faces" / TABLES["faces"])["clip_id"].str.startswith(clip)
    rejected = pd.read_csv(remote / "faces" / "rejects.csv")
    outcome = rejected[rejected["reason"].str.contains(f"[clip {clip}", regex=False)]["reason"].tolist()
    assert kept.any() or (outcome and not any(r.startswith("crashed") for r in outcome)), (clip, outcome)
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE

    for stage, table in TABLES.items():
        ours, theirs = _table(local / stage / table, local), _table(remote / stage / table, remote)
        assert len(ours), stage
        pd.testing.assert_frame_equal(ours, theirs, obj=f"{stage}/{table}")
        rej_ours, rej_theirs = (_table(r / stage / "rejects.csv", r) for r in (local, remote))
        pd.testing.assert_frame_equal(rej_ours, rej_theirs, obj=f"{stage}/rejects.csv")
        assert rej_ours["reason"].str.len().gt(0).all(), stage
    reasons = {stage: sorted(pd.read_csv(remote / stage / "rejects.csv")["reason"].str.split(":").str[0])
               for stage in TABLES}
    assert reasons["ingest"] == ["no_audio", "not_video", "unreadable"], reasons
    assert "no_face" in reasons["faces"], reasons
    # what the workers wrote, not only the tables
    for clip in pd.read_parquet(local / "faces" / TABLES["faces"])["clip_id"]:
        with np.load(local / "faces" / "landmarks" / f"{clip}.npz") as a, \
                np.load(remote / "faces" / "landmarks" / f"{clip}.npz") as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files), clip
        ours, theirs = (load_file(r / "features" / f"{clip}.safetensors") for r in (local, remote))
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].equal(theirs[key]), f"{clip} {key}"
    for pattern in ("scenes/clips/*.mp4", "faces/crops/*.mp4"):
        files = sorted(p.relative_to(local) for p in local.glob(pattern))
        assert files == sorted(p.relative_to(remote) for p in remote.glob(pattern)), pattern
        for rel in files:
            assert (local / rel).read_bytes() == (remote / rel).read_bytes(), rel


def crash_on(item: str) -> str:
    """What a file that crashes its worker does (e.g. a decoder segfault): the process dies."""
    if item == "poison":
        os._exit(3)
    return item.upper()


def test_an_item_that_kills_every_worker_running_it_becomes_a_reject(cluster):
    cluster.wait_for_workers()  # the nannies have restarted what an earlier test killed
    results = map_videos(crash_on, ["a", "poison", "b"], workers=2, address=cluster.address, desc="poison")
    assert results == ["A", Crashed(f"KilledWorker: a worker died running it {ALLOWED_FAILURES + 1} times"), "B"]
    cluster.wait_for_workers()  # and the cluster is whole again
