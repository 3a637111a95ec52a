"""Where the MLflow store is: ``MLFLOW_TRACKING_URI`` when set, otherwise ``sqlite:///<project root>/mlflow.db``
(artifacts in ``<project root>/mlartifacts``; both git-ignored). The project root is the *original*
repository even inside ``dvc exp run`` workspaces: ``DVC_ROOT`` (DVC sets it for every stage command,
pointing at the parent repo for temp and queued experiments), else the path before ``.dvc/tmp/exps/``
in the working directory, else the main worktree of git (its common dir), else the nearest folder
with ``.dvc`` or ``.git``. HTTP stores get short timeouts and few retries so a dead server costs
seconds, not minutes.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Optional

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
OFFLINE_DIR = Path("logs") / "mlflow-offline"
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingUnavailable(UserWarning):
    """The tracking store failed; the run goes on logging locally."""


def project_root(start: str | Path | None = None) -> Path:
    """The original project folder, also from inside ``dvc exp`` workspaces and git worktrees."""
    if start is None and os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for folder in (here, *here.parents):
        if (folder / ".git").is_file():  # a linked worktree: the main one holds the store
            common = _git(["rev-parse", "--path-format=absolute", "--git-common-dir"], folder)
            if common:
                return Path(common).parent
        if (folder / ".dvc").is_dir() or (folder / ".git").is_dir():
            return folder
    return here


def default_tracking_uri(project_dir: str | Path | None = None) -> str:
    """``sqlite:///`` + the absolute path of ``mlflow.db`` at the project root."""
    root = Path(project_dir).resolve() if project_dir is not None else project_root()
    return f"sqlite:///{root / DB_NAME}"


def tracking_uri(project_dir: str | Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(project_dir)


def is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def _git(args: list[str], cwd: str | Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(cwd: str | Path | None = None) -> tuple[str, bool]:
    """(commit of HEAD or 'unknown', whether tracked files differ from it)."""
    cwd = cwd or Path.cwd()
    rev = _git(["rev-parse", "HEAD"], cwd)
    if not rev:
        return "unknown", False
    return rev, bool(_git(["status", "--porcelain", "--untracked-files=no"], cwd))


def http_defaults(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)


@contextlib.contextmanager
def no_retries(uri: str):
    """Probe a remote store once, quickly, before committing a run to it."""
    if not uri.startswith(("http://", "https://")):
        yield
        return
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_sqlite(uri: str) -> None:
    """Fail fast on a sqlite store that cannot open (MLflow itself retries for ~100 s)."""
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3

    path = Path(uri.removeprefix("sqlite:///"))
    path = path if path.is_absolute() else Path("/", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as err:
        raise OSError(f"sqlite store {path}: {err}") from None


def experiment_id(client, name: str, uri: str, root: Path) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (root / ARTIFACTS_DIR).as_uri() if is_local(uri) else None
    try:
        # the MLflow 3 UI opens "model training" experiments on their runs table (not the GenAI overview)
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
