"""Where a run's records go: one MLflow run written through ``MlflowClient`` (no global active-run
state), or, when no store works, a JSONL file under ``<project root>/logs/mlflow-offline/``."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

from mcdm.tracking.registry import CANDIDATE
from mcdm.tracking.store import OFFLINE_DIR, check_sqlite, experiment_id, http_defaults, no_retries

PIPELINE_TAG = "mcdm.pipeline"  # the tag that keys the parent run of one dvc repro
# (model folder, run id, tracking URI) -> the ModelInfo of a model logged to that run (an MLflow flavour
# that holds the folder: mcdm.pipelines.pyfunc.log_pyfunc); it sets the global tracking URI
ModelLogger = Callable[[Path, str, str], Any]


class MlflowRun:
    """One MLflow run written through ``MlflowClient`` (no global active-run state)."""

    def __init__(self, uri: str, experiment: str, name: str, tags: Mapping[str, str],
                 params: Mapping[str, str], parent: Optional[str], system_metrics: Optional[float],
                 root: Path, parent_owned_key: Optional[str] = None):
        from mlflow import MlflowClient

        http_defaults(uri)
        check_sqlite(uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        with no_retries(uri):
            self.experiment_id = experiment_id(self.client, experiment, uri, root)
        self.parent = parent if parent and self._exists(parent) else None
        if self.parent is None and parent_owned_key:
            self.parent = self._keyed_parent(parent_owned_key, tags)
        run_tags = dict(tags)
        if self.parent:
            run_tags["mlflow.parentRunId"] = self.parent
            self.client.update_run(self.parent, status="RUNNING")
        run = self.client.create_run(self.experiment_id, tags=run_tags, run_name=name)
        self.run_id = run.info.run_id
        self.artifact_uri = run.info.artifact_uri
        self.log(params=params)
        self.monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=system_metrics, tracking_uri=uri)
            self.monitor.start()

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def _keyed_parent(self, key: str, tags: Mapping[str, str]) -> str:
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'",
                                        max_results=1, order_by=["attributes.start_time ASC"])
        if found:
            return found[0].info.run_id
        exp = os.environ.get("DVC_EXP_NAME")
        name = f"dvc {'exp ' + exp if exp else 'repro'} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        shared = {k: tags[k] for k in ("variant", "seed", "alpha", "params_hash", "git_rev") if k in tags}
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**shared, "stage": "pipeline", PIPELINE_TAG: key})
        return run.info.run_id

    def log(self, params: Mapping[str, str] | None = None, metrics: list[tuple] | None = None,
            tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        items = list((params or {}).items())
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        for i in range(0, len(metrics or []), 1000):
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step
                                                        in metrics[i:i + 1000]])
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def artifact(self, path: Path, artifact_path: Optional[str]) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def register(self, model_dir: Path, name: str, tags: Mapping[str, str],
                 log_model: Optional[ModelLogger] = None) -> Optional[str]:
        from mlflow.exceptions import MlflowException

        if log_model is None:  # the folder as the run's artifact
            source, model_id = f"{self.artifact_uri}/model", None
        else:  # a logged model (e.g. the pyfunc holding the folder)
            info = log_model(model_dir, self.run_id, self.uri)
            source, model_id = info.model_uri, info.model_id
        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if log_model is None:
            self.artifact(model_dir, "model")
        version = self.client.create_model_version(name, source=source, run_id=self.run_id, tags=dict(tags),
                                                   model_id=model_id).version
        self.client.set_registered_model_alias(name, CANDIDATE, version)
        self.log(tags={"registered_model": name, "registered_version": version})
        return str(version)

    def mark_killed(self, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status="KILLED")
        except MlflowException:
            pass  # the killed run lived in another store

    def end(self, status: str) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
        self.client.set_terminated(self.run_id, status=status)
        if self.parent:
            self.client.set_terminated(self.parent, status=status)

    def stop_monitor(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.finish()
            self.monitor = None


class JsonlRun:
    """The last resort: records appended to a local JSONL file, artifacts copied beside it."""

    def __init__(self, root: Path, name: str, tags: Mapping[str, str], params: Mapping[str, str]):
        self.run_id = f"offline-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.dir = root / OFFLINE_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{self.run_id}.jsonl"
        self.uri = str(self.path)
        self._write({"kind": "start", "name": name, "tags": dict(tags), "params": dict(params)})

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def log(self, params=None, metrics=None, tags=None) -> None:
        if params:
            self._write({"kind": "params", "params": dict(params)})
        if tags:
            self._write({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})
        for key, value, _, step in metrics or []:
            self._write({"kind": "metric", "key": key, "value": value, "step": step})

    def artifact(self, path: Path, artifact_path: Optional[str]) -> None:
        dest = self.dir / self.run_id / (artifact_path or "") / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, dest)
        self._write({"kind": "artifact", "path": str(dest), "artifact_path": artifact_path})

    def register(self, model_dir: Path, name: str, tags: Mapping[str, str],
                 log_model: Optional[ModelLogger] = None) -> Optional[str]:
        self._write({"kind": "register_skipped", "model_dir": str(model_dir), "name": name, "tags": dict(tags)})
        return None

    def mark_killed(self, run_id: str) -> None:
        pass

    def end(self, status: str) -> None:
        self._write({"kind": "end", "status": status})

    def stop_monitor(self) -> None:
        pass
