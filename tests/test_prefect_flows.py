"""Prefect: a real server on a free loopback port, deployments served by flows/serve.py, runs started
through `prefect deployment run ... --watch` exactly as a user does (no mocks)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tool_env

sys.path.insert(0, str(ROOT / "flows"))


@pytest.fixture(scope="module")
def prefect_api(prefect_server):
    """`make prefect-up`'s path: the session's server (mcdm.services) and a serve process started by pid."""
    from mcdm.services import start, stop

    api, home, run_dir, port = prefect_server
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))  # keep the test's server DB out of the repo
        start("prefect-serve", port, run_dir, ROOT, timeout=180)
        try:
            yield api, home
        finally:
            stop("prefect-serve", run_dir)


def _deployment_run(api: str, home: Path, name: str, params: dict) -> subprocess.CompletedProcess:
    args = ["prefect", "deployment", "run", name, "--watch", "--watch-timeout", "600"]
    for k, v in params.items():
        args += ["--param", f"{k}={v}"]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                          env=tool_env(PREFECT_API_URL=api, PREFECT_HOME=str(home)), timeout=900)


def test_main_line_stage_order_follows_dvc_yaml():
    from pipeline import main_line_stages

    stages = main_line_stages(ROOT)
    declared = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert stages[0] == "sample_data"
    assert [s for s in declared if s in stages] == stages


def test_deployment_run_completes_and_updates_dvc_lock(prefect_api, project_copy):
    api, home = prefect_api
    proc = _deployment_run(api, home, "train-all/local",
                           {"project_dir": str(project_copy), "target": "sample_data"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Completed" in out
    lock = yaml.safe_load((project_copy / "dvc.lock").read_text())
    assert "sample_data" in lock["stages"]
    assert (project_copy / "data" / "sample" / "manifest.csv").exists()


def test_failing_stage_fails_the_flow_with_the_stage_error(prefect_api, project_copy):
    api, home = prefect_api
    params = project_copy / "params.yaml"
    params.write_text(params.read_text().replace("alpha: 0.1", "alpha: 2.0"))
    proc = _deployment_run(api, home, "train-all/local",
                           {"project_dir": str(project_copy), "target": "sample_data"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Failed" in out
    # the stage's own one-line error reached the flow run's logs
    logs = subprocess.run(
        [sys.executable, "-c", _LOGS_SCRIPT], capture_output=True, text=True,
        env=tool_env(PREFECT_API_URL=api, PREFECT_HOME=str(home)), timeout=120,
    )
    assert "alpha: Input should be less than or equal to 1" in logs.stdout, logs.stdout[-2000:] + logs.stderr[-2000:]


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
