"""decisions.md #24: the micro pipeline's outputs go to a local-folder DVC remote (`dvc remote add -d`,
`dvc push`) and come back into a fresh git clone (`dvc pull`) byte for byte.

What goes to git is what a user commits: everything git sees (dvc.lock, .dvc/config, the .gitignore
files DVC wrote, the small `cache: false` reports). The training stages' DeepSpeed checkpoints are
resume state, not DVC outputs and git-ignored: a fresh clone after `dvc pull` has nothing to re-run.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import tool_env
from workspace import copy_tree


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"$ {' '.join(args)}\n{(done.stdout + done.stderr)[-3000:]}"
    return done.stdout


def _outs(root: Path) -> dict[str, str]:
    """Every output of the pipeline (outs, metrics, plots) -> "cached", "git" or "resume" (persistent and
    uncached), as DVC itself reads dvc.yaml (templates and matrices resolved)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {out.def_path: "cached" if out.use_cache else "resume" if out.persist else "git"
                for stage in repo.index.stages for out in stage.outs}


def _files(root: Path, rel: str) -> dict[str, bytes]:
    path = root / rel
    if path.is_file():
        return {rel: path.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pulled(micro_pipeline, tmp_path_factory):
    """(project, fresh clone after `dvc pull`, outputs by kind)."""
    tmp = tmp_path_factory.mktemp("remote")
    project = copy_tree(micro_pipeline, tmp / "proj")
    outs = _outs(project)
    remote = tmp / "dvc-storage"
    # the README's commands: a default remote (a folder here), then push
    _run(["dvc", "remote", "add", "-d", "local", str(remote)], project)
    _run(["dvc", "push"], project)
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"
    with open(project / ".git" / "info" / "exclude", "a") as fh:
        fh.writelines(f"/{rel}\n" for rel, kind in outs.items() if kind == "resume")
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline outputs"], project)

    clone = tmp / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp)
    cached = [rel for rel, kind in outs.items() if kind == "cached"]
    assert cached and not any((clone / rel).exists() for rel in cached)  # git alone does not carry them
    _run(["dvc", "pull"], clone)
    return project, clone, outs


def test_pull_into_a_fresh_clone_gives_the_same_files(pulled):
    project, clone, outs = pulled
    for rel, kind in outs.items():
        if kind != "resume":
            assert _files(clone, rel) == _files(project, rel), rel


def test_a_fresh_clone_after_pull_has_nothing_to_rerun(pulled):
    _, clone, outs = pulled
    status = json.loads(_run(["dvc", "status", "--json"], clone))
    changes = [(stage, kind, detail) for stage, items in status.items() for item in items
               for kind, detail in (item.items() if isinstance(item, dict) else [(item, {})])]
    assert not changes, status
