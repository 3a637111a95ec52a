"""Prefect: a real server on a free loopback port, deployments served by flows/serve.py, runs started
through `prefect deployment run ... --watch` exactly as a user does (no mocks)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT

from mcdm.tracking.store import default_tracking_uri

sys.path.insert(0, str(ROOT / "flows"))


def _deployment_run(env: dict, project: Path, name: str, params: dict) -> subprocess.CompletedProcess:
    args = ["prefect", "deployment", "run", name, "--watch", "--watch-timeout", "600"]
    for k, v in params.items():
        args += ["--param", f"{k}={v}"]
    return subprocess.run(args, capture_output=True, text=True, cwd=project, env=env, timeout=900)


def _parent_runs(project: Path) -> list:
    """The train-all flow's MLflow parent runs in the project's store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=default_tracking_uri(project))
    return [r for exp in client.search_experiments() for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("flow") == "train-all"]


def test_main_line_stage_order_follows_dvc_yaml():
    from pipeline import main_line_stages

    stages = main_line_stages(ROOT)
    declared = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert stages[:2] == ["params_check", "sample_data"]
    assert [s for s in declared if s in stages] == stages


def test_deployment_run_completes_and_updates_dvc_lock(served):
    project, env = served
    proc = _deployment_run(env, project, "train-all/local", {"target": "sample_data"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Completed" in out
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert "sample_data" in lock["stages"]
    assert (project / "data" / "sample" / "manifest.csv").exists()
    # the flow's MLflow parent run ended with the flow (never left RUNNING)
    runs = _parent_runs(project)
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_name, r.info.status) for r in runs]


def test_failing_stage_fails_the_flow_with_the_stage_error(served):
    project, env = served  # after the test above: sample_data done, params now broken
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("alpha: 0.1", "alpha: 2.0"))
    proc = _deployment_run(env, project, "train-all/local", {"target": "sample_data"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Failed" in out
    # the stage's own one-line error reached the flow run's logs
    logs = subprocess.run([sys.executable, "-c", _LOGS_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert "alpha: Input should be less than or equal to 1" in logs.stdout, logs.stdout[-2000:] + logs.stderr[-2000:]
    assert sorted(r.info.status for r in _parent_runs(project)) == ["FAILED", "FINISHED"]


_LOGS_SCRIPT = """
import asyncio
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import FlowRunSort

async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[0].id])))
        print(runs[0].state.type.value)
        for log in logs:
            print(log.message)

asyncio.run(main())
"""
