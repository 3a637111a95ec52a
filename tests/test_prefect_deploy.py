"""The work-pool path (decisions.md #17), no mocks: on a real Prefect server (free loopback port),
`python flows/deploy.py --pool NAME` deploys flows/serve.py's deployments from the project's own folder
to a process pool, and a real `prefect worker start --pool NAME` (started and stopped by its pid)
runs one of them through `prefect deployment run ... --watch` to Completed."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, stop_session, tool_env
from mlflow import MlflowClient
from workspace import copy_tree

from mcdm.tracking.store import default_tracking_uri

POOL = "mcdm-test-pool"
DEPLOYED = {"train-all/mcdm-test-pool", "data-prep/mcdm-test-pool", "evaluate/mcdm-test-pool",
            "ablations/mcdm-test-pool", "train-all/mcdm-test-pool-nightly"}


@pytest.fixture(scope="module")
def prefect_env(prefect_client_env):
    """The session's Prefect server (mcdm.services, as `make prefect-up` starts it): URL, home and secret."""
    return prefect_client_env


@contextlib.contextmanager
def running_worker(env: dict, log: Path):
    """`prefect worker start --pool POOL` in its own session, stopped by that pid's process group."""
    env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}  # poll the pool every 2 s, not 10
    with open(log, "w") as fh:
        proc = subprocess.Popen(["prefect", "worker", "start", "--pool", POOL], cwd=log.parent, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop_session(proc)


def _state(env: dict) -> dict:
    """The pool's deployments and the latest flow run with its logs, read through the Prefect client."""
    out = subprocess.run([sys.executable, "-c", _STATE_SCRIPT, POOL], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_deploy_to_a_process_pool_and_a_worker_runs_it(micro_pipeline, prefect_env, tmp_path):
    project = copy_tree(micro_pipeline, tmp_path / "proj")

    # the user's command, from the project root; the pool does not exist yet
    deployed = subprocess.run([sys.executable, "flows/deploy.py", "--pool", POOL], cwd=project, env=prefect_env,
                              capture_output=True, text=True, timeout=300)
    out = deployed.stdout + deployed.stderr
    assert deployed.returncode == 0, out[-3000:]
    assert f"work pool '{POOL}' (process): created" in out
    state = _state(prefect_env)
    assert state["pool_type"] == "process"
    deployments = state["deployments"]
    assert set(deployments) == DEPLOYED
    for name, d in deployments.items():
        assert d["entrypoint"] == f"flows/pipeline.py:{d['function']}", name
        # local source: the worker's flow runs start in this project folder; no image, no git clone
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                    {"directory": str(project.resolve())}}], name
        assert d["paused"] == name.endswith("-nightly"), name
    assert deployments["train-all/mcdm-test-pool-nightly"]["crons"] == ["0 2 * * *"]

    # a real run on the worker: train-all up to sample_data, whose output we removed; DVC restores it
    manifest = project / "data" / "sample" / "manifest.csv"
    expected = manifest.read_bytes()
    manifest.unlink()
    started = time.time()
    log = tmp_path / "worker.log"
    with running_worker(prefect_env, log):
        run = subprocess.run(["prefect", "deployment", "run", f"train-all/{POOL}", "--param", "target=sample_data",
                              "--watch", "--watch-timeout", "300"],
                             cwd=project, env=prefect_env, capture_output=True, text=True, timeout=400)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:] + log.read_text()[-3000:]
    assert "Completed" in out
    assert manifest.read_bytes() == expected
    state = _state(prefect_env)
    assert state["last_run"]["deployment"] == f"train-all/{POOL}"
    assert state["last_run"]["state"] == "COMPLETED"
    assert state["last_run"]["work_pool"] == POOL
    assert "$ dvc repro --single-item sample_data" in state["last_run"]["logs"]
    assert state["last_run"]["started"] >= started - 5  # this run, not an older one
    # the flow's MLflow parent run (in the project's own store) ended with the flow run on the worker
    client = MlflowClient(tracking_uri=default_tracking_uri(project))
    parents = [r for exp in client.search_experiments() for r in client.search_runs([exp.experiment_id])
               if r.data.tags.get("flow") == "train-all" and r.info.start_time >= (started - 5) * 1000]
    assert [r.info.status for r in parents] == ["FINISHED"], [(r.info.run_name, r.info.status) for r in parents]


def test_deploy_without_a_server_is_one_line(tmp_path):
    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    done = subprocess.run([sys.executable, str(ROOT / "flows" / "deploy.py"), "--pool", POOL], cwd=tmp_path,
                          env=tool_env(PREFECT_API_URL=api), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"deploy: error: cannot reach the Prefect API at {api} (ConnectError); "
        "start it with `make prefect-up` or set PREFECT_API_URL"], done.stderr[-2000:]


_STATE_SCRIPT = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import FlowRunSort

pool = sys.argv[1]
with get_client(sync_client=True) as client:
    flows = {f.id: f.name for f in client.read_flows()}
    deployments = {}
    for d in client.read_deployments():
        if d.work_pool_name != pool:
            continue
        deployments[f"{flows[d.flow_id]}/{d.name}"] = {
            "entrypoint": d.entrypoint, "function": d.entrypoint.split(":")[-1], "pull_steps": d.pull_steps,
            "paused": d.paused, "crons": [getattr(s.schedule, "cron", None) for s in d.schedules]}
    by_id = {d.id: f"{flows[d.flow_id]}/{d.name}" for d in client.read_deployments()}
    runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    last = None
    if runs:
        r = runs[0]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id])))
        last = {"deployment": by_id.get(r.deployment_id), "state": r.state.type.value,
                "work_pool": r.work_pool_name, "started": r.start_time.timestamp() if r.start_time else 0,
                "logs": "\\n".join(log.message for log in logs)}
    print(json.dumps({"pool_type": client.read_work_pool(pool).type, "deployments": deployments,
                      "last_run": last}))
"""

