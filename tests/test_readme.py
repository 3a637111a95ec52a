"""The README is a tested user guide (decisions.md #13): its fenced commands run, on the micro profile.

Every fenced shell block of README.md carries a marker on the line before its fence:

    <!-- runnable -->                                  run here, line by line, as written
    <!-- covered-by: tests/FILE.py::TEST: why -->      run by that test instead (which must exist)
    <!-- not-runnable: why -->                         needs what a test machine lacks (GPUs, your files)

Runnable blocks run in README order in ONE copy of the session's micro pipeline (``micro_pipeline``),
so later blocks see what earlier ones made, as a reader's checkout would. The harness decides only
where things live: free loopback ports for the services (`MLFLOW_PORT`, `PREFECT_PORT` for make and
`PREFECT_API_URL` for the Prefect CLI), the venv (the copy's `.venv` shows this test's venv, so make
never installs), and the micro profile, re-applied after a block that switched profiles (other changes stay, as
in a reader's checkout: after `dvc exp run -S alpha=0.5` the workspace is at alpha 0.5).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, VENV_BIN, free_port, tool_env
from workspace import copy_tree

from mcdm.eval.metric_files import HEADLINE

README = ROOT / "README.md"
SHELL = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"^<!--\s*(runnable|covered-by|not-runnable)\s*(?::\s*(.*?))?\s*-->$")
COMMAND_TIMEOUT = 600


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    kind: str | None  # runnable | covered-by | not-runnable | None (no marker)
    note: str
    commands: list[str]

    @property
    def id(self) -> str:
        first = self.commands[0].split("#")[0].strip() if self.commands else ""
        return f"L{self.line}:" + "_".join(first.split())[:40]


def commands_of(body: list[str]) -> list[str]:
    """One command per line (a trailing backslash continues it); blank and comment lines dropped."""
    out, pending = [], ""
    for raw in body:
        line = raw.rstrip()
        if pending:
            line = pending + " " + line.lstrip()
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def parse_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev)
        blocks.append(Block(i + 1, fence.group(2).lower(), marker and marker.group(1), (marker and marker.group(2)) or "",
                            commands_of(lines[i + 1:end])))
        i = end + 1
    return blocks


BLOCKS = parse_blocks(README.read_text())
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL]
RUNNABLE = [b for b in SHELL_BLOCKS if b.kind == "runnable"]


def test_every_fence_is_shell_with_a_marker_or_declares_its_language():
    assert RUNNABLE, "README.md: no runnable block"
    commands = {c.split("#")[0].strip() for b in RUNNABLE for c in b.commands}
    assert set(CLAIMS) <= commands, f"README.md: no runnable command for the checks of {set(CLAIMS) - commands}"
    for b in BLOCKS:
        assert b.lang, f"README.md:{b.line}: a fence without a language (```bash for commands, ```text otherwise)"
        if b.lang in SHELL:
            assert b.kind, f"README.md:{b.line}: a command block without <!-- runnable | covered-by | not-runnable -->"
            assert b.commands, f"README.md:{b.line}: a command block without commands"
            if b.kind != "runnable":
                assert b.note, f"README.md:{b.line}: {b.kind} needs its reason"


@pytest.mark.parametrize("block", [b for b in SHELL_BLOCKS if b.kind == "covered-by"], ids=lambda b: b.id)
def test_covered_by_names_an_existing_test(block):
    target = block.note.split(":", 2)  # tests/FILE.py::TEST: why
    assert len(target) == 3 and target[1] == "", f"README.md:{block.line}: covered-by: tests/FILE.py::TEST: why"
    path, name = ROOT / target[0], target[2].split(":")[0].strip()
    assert path.is_file(), f"README.md:{block.line}: {target[0]} does not exist"
    assert re.search(rf"^def {re.escape(name)}\(", path.read_text(), re.M), \
        f"README.md:{block.line}: {target[0]} has no test {name}"


def venv_view(dest: Path) -> None:
    """``dest`` (the copy's .venv) shows this test's venv, with an install stamp newer than pyproject.toml,
    so the Makefile's install rule has nothing to do (it would otherwise re-point the editable install)."""
    real = VENV_BIN.parent
    dest.mkdir()
    for entry in real.iterdir():
        if entry.name != ".mcdm-install-stamp":
            (dest / entry.name).symlink_to(entry)
    (dest / ".mcdm-install-stamp").touch()


@pytest.fixture(scope="module")
def user(micro_pipeline, tmp_path_factory):
    """A reader's checkout: a copy of the micro pipeline, its venv, free ports for the services."""
    root = copy_tree(micro_pipeline, tmp_path_factory.mktemp("readme") / "proj")
    venv_view(root / ".venv")
    prefect_port = free_port()
    env = tool_env(MLFLOW_PORT=str(free_port()), PREFECT_PORT=str(prefect_port),
                   PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api")
    for key in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", "MAKEFLAGS", "MAKELEVEL"):
        env.pop(key, None)  # the copy's own settings ([tool.prefect] home, mlflow.db), as in a new shell
    micro = (root / "params.yaml").read_text()
    yield root, env, micro
    for stop in ("prefect-down", "mlflow-down"):  # a block that failed half-way left its services up
        subprocess.run(["make", stop], cwd=root, env=env, capture_output=True, timeout=120)


def exp_run_reruns_only_what_reads_alpha(out: str, root: Path, env: dict) -> None:
    """The Experiments section's claim (decisions.md #10, issue 6): `dvc exp run -S alpha=0.5` re-runs
    only train_stage3 and the stages after it that read its model or its evaluation (evaluate, open_set,
    claims, report), and `dvc exp show` lists the experiment with alpha 0.5 and its headline metrics
    (reports/metrics.json: the paper's six, identity, failure rate, seconds per frame) beside the baseline."""
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"params_check", "train_stage3", "evaluate", "open_set", "claims", "report"}, out[-3000:]
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=root, env=env, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    exps = [e for base in json.loads(shown.stdout) for e in (base.get("experiments") or [])]
    data = [e["revs"][0]["data"] for e in exps if e["revs"][0]["data"]["params"]["params.yaml"]["data"]["alpha"] == 0.5]
    assert data, shown.stdout[:2000]
    metrics = data[0]["metrics"]["reports/metrics.json"]["data"]
    assert set(metrics) == {*HEADLINE, "fallback"} and math.isfinite(metrics["ssim"]), metrics


# what a runnable command's output must show beyond exit 0 (the README says so beside it)
CLAIMS = {"dvc exp run -S alpha=0.5": exp_run_reruns_only_what_reads_alpha}


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_runnable_block(block, user):
    root, env, micro = user
    for command in block.commands:
        started = time.time()
        done = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT)
        out = (done.stdout + done.stderr)[-4000:]
        assert done.returncode == 0, f"README.md:{block.line}: `{command}` exited {done.returncode}:\n{out}"
        print(f"{time.time() - started:6.1f} s  {command}")
        claim = CLAIMS.get(command.split("#")[0].strip())
        if claim:
            claim(done.stdout + done.stderr, root, env)
    if any(c.startswith("mcdm params apply") for c in block.commands):  # the profiles block ends on paper
        subprocess.run(["mcdm", "params", "apply", "micro"], cwd=root, env=env, check=True, capture_output=True)
        assert (root / "params.yaml").read_text() == micro
