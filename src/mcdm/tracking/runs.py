"""MLflow tracking: where the store is, one run per stage nested under one run per pipeline
execution, params / tags / metrics / pictures, the model registry, and a fallback so that tracking
never stops a training run.

**Store.** ``MLFLOW_TRACKING_URI`` when set; otherwise ``sqlite:///<project root>/mlflow.db``.
Runs in local stores keep their artifacts in ``<project root>/mlartifacts`` (both git-ignored).
The project root is the *original* repository even inside ``dvc exp run`` workspaces: ``DVC_ROOT``
(DVC sets it for every stage command, pointing at the parent repo for temp and queued experiments),
else the path before ``.dvc/tmp/exps/`` in the working directory, else the main worktree of git
(its common dir), else the nearest folder with ``.dvc`` or ``.git``.

**Runs.** :func:`stage_run` opens the run of one stage (on rank 0; other ranks get a no-op), tagged
``stage, variant, seed, alpha, params_hash, git_rev`` (+ ``dvc_stage``, ``git_dirty``), with the
validated params flattened as MLflow params. Its parent is

* ``MCDM_PARENT_RUN_ID`` when set: a Prefect flow opens it (:func:`start_parent_run`) and passes it on;
* otherwise a run keyed by the ``dvc`` process that started this stage (host, pid, start time, and
  ``DVC_EXP_NAME``): the first stage of a ``dvc repro`` creates it, the following stages find it by
  that tag, so all stages of one ``dvc repro`` / ``dvc exp run`` nest under one parent;
* neither (the stage started by hand): the stage's run is top-level.
The parent's status follows its children: RUNNING while a stage runs, then the stage's end status.

**Fallback.** An unreachable server (or any store error) never kills the run: the first failure
warns once (:class:`TrackingUnavailable`) and the run continues in the local sqlite store of the
project, with the same tags and params plus ``mcdm.offline_from=<uri>``. If that store fails too,
records go to ``<project root>/logs/mlflow-offline/<run>.jsonl`` (artifacts copied beside it).
HTTP stores get short timeouts and few retries (``MLFLOW_HTTP_REQUEST_*`` unless already set) so a
dead server costs seconds, not minutes.

**Registry.** :meth:`Tracker.register_model` logs an exported folder and adds it as a new version
of ``registry.name`` (tags ``variant``, ``alpha``, ...), aliased ``candidate``;
:func:`register_stage_model` does so only for the main line (variant ``full`` at the default alpha,
outside :func:`ablation_member`).
:func:`promote` moves ``champion`` to a version when its ``registry.primary_metric`` beats the
champion's (lower is better unless ``registry.lower_is_better`` is false). Aliases only, never stages.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

from mcdm.config import Params, ParamsError, TrackingParams, load_params
from mcdm.errors import McdmError
from mcdm.media.images import image_grid
from mcdm.tracking.backends import JsonlRun, MlflowRun, ModelLogger
from mcdm.tracking.store import (
    OFFLINE_DIR,
    TrackingUnavailable,
    default_tracking_uri,
    experiment_id,
    git_state,
    http_defaults,
    no_retries,
    project_root,
    tracking_uri,
)

PARENT_RUN_ENV = "MCDM_PARENT_RUN_ID"
MEMBER_ENV = "MCDM_ABLATION_MEMBER"  # set while an ablation / sweep member runs: never the main line
MEMBER_KIND_ENV = "MCDM_MEMBER_KIND"  # "ablation" or "sweep", beside MEMBER_ENV
METRIC_FLUSH_SECONDS = 5.0
METRIC_FLUSH_COUNT = 500


# --------------------------------------------------------------------------------------------------
# Where things are


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"stage1": {"lr": 1e-4}}}`` -> ``{"train.stage1.lr": "0.0001"}`` (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))[:6000]
        else:
            out[name] = str(value)[:6000]
    return out


def pipeline_key() -> Optional[str]:
    """Identifies the ``dvc repro`` / ``dvc exp run`` execution this process belongs to: the nearest
    ``dvc`` ancestor process (plus the experiment name DVC exports), or None outside DVC."""
    import psutil

    try:
        ancestors = psutil.Process().parents()
    except psutil.Error:
        return None
    for proc in ancestors:
        try:
            cmd = proc.cmdline()
            started = proc.create_time()
        except psutil.Error:
            continue
        names = [Path(c).name for c in cmd[:2]]
        if "dvc" in names or cmd[1:3] == ["-m", "dvc"]:
            key = f"{socket.gethostname()}:{proc.pid}:{started:.2f}"
            exp = os.environ.get("DVC_EXP_NAME")
            return f"{key}:{exp}" if exp else key
    return None


def run_tags(params, stage: str) -> dict[str, str]:
    rev, dirty = git_state()
    tags = {"stage": stage, "variant": params.variant, "seed": str(params.seed), "alpha": str(params.alpha),
            "params_hash": params.hash(), "git_rev": rev, "git_dirty": str(dirty).lower()}
    if rev != "unknown":
        tags["mlflow.source.git.commit"] = rev
    if os.environ.get("DVC_STAGE"):
        tags["dvc_stage"] = os.environ["DVC_STAGE"]
    if os.environ.get(MEMBER_ENV):
        tags["ablation_member"] = os.environ[MEMBER_ENV]
        tags["member_kind"] = os.environ.get(MEMBER_KIND_ENV, "")
    return tags


def run_name(params, stage: str) -> str:
    """``<stage> [<line>: <variant> alpha=<alpha> seed=<seed>]``, where the line is ``main line``, or
    ``ablation <member>`` / ``sweep <member>`` inside :func:`ablation_member`: the three read apart
    in MLflow's run table (a ``full`` ablation member trains the same variant as the main line)."""
    member = os.environ.get(MEMBER_ENV)
    line = f"{os.environ.get(MEMBER_KIND_ENV) or 'member'} {member}" if member else "main line"
    return f"{stage} [{line}: {params.variant} alpha={params.alpha} seed={params.seed}]"


def is_main_line(params) -> bool:
    """The run that registers model versions: variant ``full`` at the schema's default alpha, and not
    a member of the ablation matrix or the alpha sweep (a ``full`` member at alpha 0.1 is not it)."""
    if os.environ.get(MEMBER_ENV):
        return False
    return params.variant == "full" and params.alpha == Params.model_fields["alpha"].default


@contextlib.contextmanager
def ablation_member(name: str, kind: str = "ablation") -> Iterator[None]:
    """Runs inside the block belong to the matrix member ``name`` of ``kind`` (``ablation`` or
    ``sweep``): tagged ``ablation_member`` and ``member_kind``, named after it (:func:`run_name`), never
    the main line (no registry version, no champion), also in child processes (the environment)."""
    saved = {key: os.environ.get(key) for key in (MEMBER_ENV, MEMBER_KIND_ENV)}
    os.environ[MEMBER_ENV], os.environ[MEMBER_KIND_ENV] = name, kind
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------------
# Backends: one MLflow run, or a JSONL file when no store works


# --------------------------------------------------------------------------------------------------
# The tracker a stage uses


class Tracker:
    """The run of one stage. No method raises because the store failed: the first failure warns
    once and the run continues in the local store (then a JSONL file)."""

    def __init__(self, *, stage: str, experiment: str, tags: Mapping[str, str], params: Mapping[str, str],
                 uri: Optional[str] = None, root: Optional[Path] = None, system_metrics: Optional[float] = None,
                 run_name: Optional[str] = None):
        self.root = root or project_root()
        self.uri = uri or tracking_uri(self.root)
        self.experiment = experiment
        self.name = run_name or stage
        self.tags = dict(tags)
        self.params = dict(params)
        self.system_metrics = system_metrics
        self._pending: list[tuple] = []
        self._last_flush = time.time()
        self._warned = False
        self.backend: MlflowRun | JsonlRun | None = None
        self._open(self.uri, parent=os.environ.get(PARENT_RUN_ENV), key=pipeline_key())

    @property
    def run_id(self) -> Optional[str]:
        return self.backend.run_id if self.backend else None

    @property
    def parent_run_id(self) -> Optional[str]:
        return getattr(self.backend, "parent", None)

    def _open(self, uri: str, parent: Optional[str], key: Optional[str]) -> None:
        try:
            self.backend = MlflowRun(uri, self.experiment, self.name, self.tags, self.params, parent,
                                     self.system_metrics, self.root, parent_owned_key=None if parent else key)
            self.uri = uri
        except Exception as err:  # noqa: BLE001 -- any store failure: continue locally (the module's promise)
            self._fall_back(err, failed_uri=uri)

    def _fall_back(self, err: BaseException, failed_uri: str) -> None:
        if self.backend is not None:
            self.backend.stop_monitor()
        local = default_tracking_uri(self.root)
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        offline = {"mcdm.offline_from": failed_uri}
        if failed_uri != local:
            target = f"the local store {local}"
        else:
            target = f"{self.root / OFFLINE_DIR}"
        if not self._warned:
            warnings.warn(f"MLflow tracking at {failed_uri} failed ({type(err).__name__}: {first_line}); "
                          f"the run continues, logging to {target}", TrackingUnavailable, stacklevel=4)
            self._warned = True
        self.tags.update(offline)
        self.backend = None
        if failed_uri != local:
            try:
                self.backend = MlflowRun(local, self.experiment, self.name, self.tags, self.params, None,
                                         self.system_metrics, self.root)
                self.uri = local
                return
            except Exception:  # noqa: BLE001 -- the local store failed as well: JSONL below
                pass
        try:
            self.backend = JsonlRun(self.root, self.name, self.tags, self.params)
            self.uri = self.backend.uri
        except OSError:
            self.backend = None  # nowhere to write: tracking is off for this run

    def _safe(self, fn) -> Any:
        """Run ``fn(backend)``; on a store failure switch backend (warning once) and retry there."""
        for _ in range(3):
            if self.backend is None:
                return None
            try:
                return fn(self.backend)
            except Exception as err:  # noqa: BLE001 -- see the class docstring
                self._fall_back(err, failed_uri=self.uri)
        return None

    # -- logging ----------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten_params(params)
        self.params.update(flat)
        self._safe(lambda b: b.log(params=flat))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        tags = {k: str(v) for k, v in tags.items()}
        self.tags.update(tags)
        self._safe(lambda b: b.log(tags=tags))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._pending.extend((k, float(v), ts, int(step)) for k, v in metrics.items())
        if len(self._pending) >= METRIC_FLUSH_COUNT or time.time() - self._last_flush >= METRIC_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        self._last_flush = time.time()
        if pending:
            self._safe(lambda b: b.log(metrics=pending))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if not path.exists():
            raise McdmError(f"artifact {path} does not exist")
        self.flush()
        self._safe(lambda b: b.artifact(path, artifact_path))

    def log_image_grid(self, frames, name: str = "samples.png", artifact_path: str = "samples",
                       ncols: Optional[int] = None) -> Path:
        """Tile frames into one PNG and log it; returns the PNG's local path."""
        from PIL import Image

        grid = image_grid(frames, ncols)
        out = Path(tempfile.mkdtemp(prefix="mcdm-grid-")) / name
        Image.fromarray(grid).save(out)
        self.log_artifact(out, artifact_path)
        return out

    def log_video(self, path: str | Path, artifact_path: str = "samples") -> None:
        """Log a sample mp4 (e.g. written by :func:`mcdm.media.io.write_video`)."""
        self.log_artifact(path, artifact_path)

    def resumed(self, step: int, previous_run: Optional[str]) -> None:
        """Called by the engine when it resumes: tag this run and close the killed one."""
        self.set_tags({"resumed_from_step": step, **({"resumed_from_run": previous_run} if previous_run else {})})
        if previous_run and previous_run != self.run_id:
            self._safe(lambda b: b.mark_killed(previous_run))

    def register_model(self, model_dir: str | Path, name: str, tags: Mapping[str, Any],
                       log_model: Optional[ModelLogger] = None) -> Optional[str]:
        """Log ``model_dir`` (as ``log_model`` logs it, else as a folder) and add it as a new version of
        ``name`` (alias ``candidate``)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise McdmError(f"model folder {model_dir} does not exist")
        self.flush()
        version = self._safe(lambda b: b.register(model_dir, name, {k: str(v) for k, v in tags.items()},
                                                  log_model))
        if version is None:
            warnings.warn(f"{name}: no version registered (no model registry reachable); register "
                          f"{model_dir} later", TrackingUnavailable, stacklevel=2)
        return version

    def close(self, status: str = "FINISHED") -> None:
        self.flush()
        self._safe(lambda b: b.end(status))


class NullTracker:
    """What ranks other than 0 get: every call does nothing."""

    run_id = None
    parent_run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stage_run(params, stage: str, *, tags: Optional[Mapping[str, Any]] = None) -> Iterator[Tracker | NullTracker]:
    """The MLflow run of one stage (see the module docstring): params logged, tags set, ended with
    FINISHED / FAILED / KILLED as the block ends."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield NullTracker()
        return
    all_tags = {**run_tags(params, stage), **{k: str(v) for k, v in (tags or {}).items()}}
    tracker = Tracker(stage=stage, experiment=params.tracking.experiment, tags=all_tags,
                      params=flatten_params(params.model_dump(mode="json")), run_name=run_name(params, stage),
                      system_metrics=params.tracking.system_metrics_interval if params.tracking.system_metrics else None)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(status)


def register_stage_model(tracker, params, model_dir: str | Path,
                         log_model: Optional[ModelLogger] = None) -> Optional[str]:
    """After stage 3: a new version of ``registry.name`` from the main line only (decisions.md #16),
    logged by ``log_model`` (stage 3: the pyfunc, decisions.md #28)."""
    if not is_main_line(params):
        return None
    return tracker.register_model(model_dir, params.registry.name,
                                  {"variant": params.variant, "alpha": params.alpha, "seed": params.seed,
                                   "params_hash": params.hash(), "git_rev": tracker.tags.get("git_rev", "unknown")},
                                  log_model)


# --------------------------------------------------------------------------------------------------
# Parent runs for flows, promotion


def _experiment_name(project_dir: Path) -> str:
    try:
        return load_params(project_dir / "params.yaml").tracking.experiment
    except (ParamsError, OSError):
        return TrackingParams().experiment


def start_parent_run(project_dir: str | Path, name: str, tags: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Open the parent run of one flow execution; put its id in ``MCDM_PARENT_RUN_ID`` of the
    stages' environment. Returns None (with a warning) when no store is reachable."""
    from mlflow import MlflowClient

    root = Path(project_dir).resolve()
    uri = tracking_uri(root)
    http_defaults(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        with no_retries(uri):
            exp = experiment_id(client, _experiment_name(root), uri, root)
        rev, _ = git_state(root)
        run = client.create_run(exp, run_name=f"{name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                tags={"stage": "pipeline", "flow": name, "git_rev": rev,
                                      **{k: str(v) for k, v in (tags or {}).items()}})
    except Exception as err:  # noqa: BLE001 -- a flow runs without tracking rather than not at all
        warnings.warn(f"MLflow tracking at {uri} failed ({type(err).__name__}); the flow runs without a "
                      "parent run", TrackingUnavailable, stacklevel=2)
        return None
    return run.info.run_id


def end_parent_run(run_id: Optional[str], status: str = "FINISHED", project_dir: str | Path | None = None) -> None:
    from mlflow import MlflowClient

    if run_id:
        MlflowClient(tracking_uri=tracking_uri(project_dir)).set_terminated(run_id, status=status)


# --------------------------------------------------------------------------------------------------
# Pictures


