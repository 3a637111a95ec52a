"""DECISIONS #24: the micro pipeline's outputs go to a local-folder DVC remote (`dvc remote add -d`,
`dvc push`) and come back into a fresh git clone (`dvc pull`) byte for byte, with nothing to re-run."""
from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import tool_env
from workspace import copy_tree


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"$ {' '.join(args)}\n{(done.stdout + done.stderr)[-3000:]}"
    return done.stdout


def _outs(root: Path) -> dict[str, bool]:
    """Every output of the pipeline (outs, metrics, plots) -> whether DVC caches it (`cache: false` ones
    are committed to git instead), as DVC itself reads dvc.yaml (templates and matrices resolved)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {out.def_path: out.use_cache for stage in repo.index.stages for out in stage.outs}


def _files(root: Path, rel: str) -> dict[str, bytes]:
    path = root / rel
    if path.is_file():
        return {rel: path.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_push_to_a_local_remote_and_pull_into_a_fresh_clone(micro_pipeline, tmp_path):
    project = copy_tree(micro_pipeline, tmp_path / "proj")
    remote = tmp_path / "dvc-storage"
    # what the README tells a user: a default remote (a folder here), then push; commit what git tracks
    _run(["dvc", "remote", "add", "-d", "local", str(remote)], project)
    _run(["dvc", "push"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline outputs"], project)
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    outs = _outs(project)
    cached = [rel for rel, use_cache in outs.items() if use_cache]
    assert cached and not any((clone / rel).exists() for rel in cached)  # git alone does not carry them
    _run(["dvc", "pull"], clone)
    for rel in outs:
        assert _files(clone, rel) == _files(project, rel), rel
    status = _run(["dvc", "status"], clone)
    assert "up to date" in status, status
