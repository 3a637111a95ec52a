"""Prefect flows over the DVC pipeline.

Thin by design: every task is one DVC command (`dvc repro <stage>`, `dvc exp run -S ...`), so caching
and lineage stay DVC's; Prefect adds parameters, schedules, concurrency limits and a UI (no retries:
a failed stage is rerun by hand, and DVC resumes it). A failing stage fails its task with the stage's own last lines in the Prefect log,
and a rerun resumes: DVC skips finished stages and training resumes from its checkpoint.

A flow runs in the checkout this file belongs to (``PROJECT_DIR``): there is no parameter that could
point it at another folder, so a caller of the Prefect API can choose stages and params of this
project, never which code runs. A served deployment runs the checkout it is served from; a work-pool
deployment the checkout `flows/deploy.py` deployed.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Optional

import yaml
from prefect import flow, get_run_logger, task

from mcdm.tracking.runs import end_parent_run, start_parent_run

PROJECT_DIR = Path(__file__).resolve().parents[1]
#: the last stage of the main line; train-all runs every non-matrix stage that leads to it
MAIN_TARGET = "evaluate"
#: gathers the main line, the ablation matrix and the sweep (run by the ablations flow, after the members)
REPORT_STAGE = "report"
ERROR_TAIL_LINES = 25


class StageFailed(RuntimeError):
    pass


def _env(project_dir: Path, parent_run_id: Optional[str]) -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = Path(sys.executable).parent
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"  # mcdm / dvc / deepspeed of this venv
    if parent_run_id:
        env["MCDM_PARENT_RUN_ID"] = parent_run_id  # MLflow: stage runs nest under the flow's run
    return env


def run_command(args: list[str], project_dir: Path, parent_run_id: Optional[str] = None) -> str:
    """Run one command in the project, streaming its output to the Prefect log; raise with its tail."""
    logger = get_run_logger()
    logger.info("$ %s", " ".join(args))
    tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
    proc = subprocess.Popen(
        args, cwd=project_dir, env=_env(project_dir, parent_run_id), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.strip():
            tail.append(line)
            logger.info(line)
    rc = proc.wait()
    if rc != 0:
        text = "\n".join(tail)
        logger.error("command failed (exit %s): %s\n%s", rc, " ".join(args), text)
        raise StageFailed(f"`{' '.join(args)}` exited {rc}; last lines:\n{text}")
    return "\n".join(tail)


def main_line_stages(project_dir: Path, target: str = MAIN_TARGET) -> list[str]:
    """Stages of dvc.yaml in file order (topological by construction) up to ``target``, no matrices."""
    stages = yaml.safe_load((project_dir / "dvc.yaml").read_text())["stages"]
    names = [name for name, body in stages.items() if "matrix" not in body and "foreach" not in body]
    if target in names:
        names = names[: names.index(target) + 1]
    return names


@task(name="dvc-repro", task_run_name="dvc repro {stage}")
def dvc_repro(stage: str, project_dir: str, parent_run_id: Optional[str] = None) -> str:
    return run_command(["dvc", "repro", "--single-item", stage], Path(project_dir), parent_run_id)


@task(name="dvc-exp-run", task_run_name="dvc exp run {target}")
def dvc_exp_run(target: str, overrides: dict[str, str], project_dir: str, queue: bool = False,
                name: Optional[str] = None) -> str:
    args = ["dvc", "exp", "run"]
    if queue:
        args.append("--queue")
    if name:
        args += ["--name", name]
    for key, value in overrides.items():
        args += ["-S", f"{key}={value}"]
    return run_command(args + [target], Path(project_dir))


@task(name="apply-profile")
def apply_profile(profile: str, project_dir: str) -> str:
    return run_command(["mcdm", "params", "apply", profile], Path(project_dir))


def _overrides(alpha: Optional[float], variant: Optional[str], overrides: Optional[dict[str, str]]) -> dict[str, str]:
    out = dict(overrides or {})
    if alpha is not None:
        out["alpha"] = str(alpha)
    if variant is not None:
        out["variant"] = variant
    return out


@flow(name="train-all", log_prints=True)
def train_all(
    target: str = MAIN_TARGET,
    profile: Optional[str] = None,
    alpha: Optional[float] = None,
    variant: Optional[str] = None,
    overrides: Optional[dict[str, str]] = None,
) -> list[str]:
    """Data stages -> stage 1 -> 2 -> 3 -> evaluate (which logs the metrics and promotes the version).

    With ``alpha`` / ``variant`` / ``overrides`` the run is a DVC experiment (`dvc exp run -S ...`),
    so the workspace params stay as they are and `dvc exp show` lists it beside the baseline.
    """
    project_dir = str(PROJECT_DIR)
    if profile:
        apply_profile(profile, project_dir)
    sets = _overrides(alpha, variant, overrides)
    if sets:
        dvc_exp_run(target, sets, project_dir)
        return [target]
    parent = start_parent_run(PROJECT_DIR, "train-all")  # the stages' MLflow runs nest under it
    status = "FAILED"
    done = []
    try:
        for stage in main_line_stages(PROJECT_DIR, target):
            dvc_repro(stage, project_dir, parent)
            done.append(stage)
        status = "FINISHED"
    except (KeyboardInterrupt, asyncio.CancelledError):
        status = "KILLED"
        raise
    finally:
        end_parent_run(parent, status, PROJECT_DIR)  # never left RUNNING once the flow has ended
    return done


@flow(name="data-prep", log_prints=True)
def data_prep(target: str = "features") -> list[str]:
    return train_all.fn(target=target)


@flow(name="evaluate", log_prints=True)
def evaluate() -> list[str]:
    dvc_repro("evaluate", str(PROJECT_DIR))
    return ["evaluate"]


def matrix_stages(project_dir: Path) -> list[str]:
    stages = yaml.safe_load((project_dir / "dvc.yaml").read_text())["stages"]
    return [name for name, body in stages.items() if "matrix" in body]


def report_input_stages(project_dir: Path, target: str = MAIN_TARGET, report: str = REPORT_STAGE) -> list[str]:
    """Non-matrix stages of dvc.yaml after the main line's ``target`` and before ``report`` (in file
    order): what the report reads beyond the main line and the matrix (open_set, token_figures, claims)."""
    stages = yaml.safe_load((project_dir / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    start = names.index(target) + 1 if target in names else 0
    stop = names.index(report) if report in names else len(names)
    return [n for n in names[start:stop] if "matrix" not in stages[n] and "foreach" not in stages[n]]


@flow(name="ablations", log_prints=True)
def ablations(report: bool = True) -> list[str]:
    """The variant x seed ablations and the alpha sweep: `dvc repro` on the matrix stages of dvc.yaml
    (decisions.md #10), so each member re-runs only the stages its variant changes and takes the rest
    from the main line; then the report's other inputs beyond the main line (open set, token figures,
    the claims answered from the members) and the report stage, which gathers the tables."""
    root, project_dir = PROJECT_DIR, str(PROJECT_DIR)
    done = []
    for stage in matrix_stages(root):
        dvc_repro(stage, project_dir)
        done.append(stage)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    if report and REPORT_STAGE in stages:
        for stage in report_input_stages(root):
            dvc_repro(stage, project_dir)
            done.append(stage)
        dvc_repro(REPORT_STAGE, project_dir)
        done.append(REPORT_STAGE)
    return done
