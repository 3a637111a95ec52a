"""Prefect flows over the DVC pipeline.

Thin by design: every task is one DVC command (`dvc repro <stage>`, `dvc exp run -S ...`), so caching
and lineage stay DVC's; Prefect adds parameters, schedules, retries (on the registry only), concurrency
limits and a UI. A failing stage fails its task with the stage's own last lines in the Prefect log,
and a rerun resumes: DVC skips finished stages and training resumes from its checkpoint.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Optional

import yaml
from prefect import flow, get_run_logger, task

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


@task(name="promote-model", retries=3, retry_delay_seconds=10)
def promote_model(project_dir: str) -> str:
    """Registry call (network when MLflow is remote): the one flaky part, so the one with retries."""
    return run_command(["mcdm", "promote"], Path(project_dir))


def _overrides(alpha: Optional[float], variant: Optional[str], overrides: Optional[dict[str, str]]) -> dict[str, str]:
    out = dict(overrides or {})
    if alpha is not None:
        out["alpha"] = str(alpha)
    if variant is not None:
        out["variant"] = variant
    return out


def _open_parent_run(project_dir: Path, flow_name: str) -> Optional[str]:
    """An MLflow parent run for this flow execution, when mcdm's tracking module is available."""
    try:
        from mcdm.tracking.runs import start_parent_run
    except ImportError:
        return None
    return start_parent_run(project_dir, flow_name)


@flow(name="train-all", log_prints=True)
def train_all(
    project_dir: str = str(PROJECT_DIR),
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
    root = Path(project_dir)
    if profile:
        apply_profile(profile, project_dir)
    sets = _overrides(alpha, variant, overrides)
    if sets:
        dvc_exp_run(target, sets, project_dir)
        return [target]
    parent = _open_parent_run(root, "train-all")
    done = []
    for stage in main_line_stages(root, target):
        dvc_repro(stage, project_dir, parent)
        done.append(stage)
    return done


@flow(name="data-prep", log_prints=True)
def data_prep(project_dir: str = str(PROJECT_DIR), target: str = "features") -> list[str]:
    return train_all.fn(project_dir=project_dir, target=target)


@flow(name="evaluate", log_prints=True)
def evaluate(project_dir: str = str(PROJECT_DIR)) -> list[str]:
    dvc_repro("evaluate", project_dir)
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
def ablations(project_dir: str = str(PROJECT_DIR), report: bool = True) -> list[str]:
    """The variant x seed ablations and the alpha sweep: `dvc repro` on the matrix stages of dvc.yaml
    (decisions.md #10), so each member re-runs only the stages its variant changes and takes the rest
    from the main line; then the report's other inputs beyond the main line (open set, token figures,
    the claims answered from the members) and the report stage, which gathers the tables."""
    root = Path(project_dir)
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
