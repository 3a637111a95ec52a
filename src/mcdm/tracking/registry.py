"""The model registry: versions of ``registry.name`` with aliases (never the deprecated stages).

Stage 3 of the main line registers a version aliased ``candidate`` (:func:`mcdm.tracking.runs.register_stage_model`);
:func:`promote` moves ``champion`` to a version when its ``registry.primary_metric`` beats the
champion's; :func:`download_model` turns ``models:/name@alias`` (or ``/version``) into a local folder.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from mcdm.errors import McdmError
from mcdm.tracking.store import tracking_uri

CANDIDATE, CHAMPION = "candidate", "champion"


def promote(name: str, version: str | int, metric: str, value: float, *, lower_is_better: bool = True,
            uri: Optional[str] = None) -> bool:
    """Record ``metric=value`` on the version and move ``champion`` to it when it beats the current
    champion (or there is none). Returns whether it became champion. Registry errors raise
    :class:`McdmError` (the caller retries; a flow does)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not math.isfinite(value):
        raise McdmError(f"{name} v{version}: {metric} is {value}, cannot rank it")
    uri = uri or tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = str(version)
    try:
        client.set_model_version_tag(name, version, metric, str(value))
        try:
            champion = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            champion = None
        if champion is not None and str(champion.version) != version:
            best = float(champion.tags.get(metric, "nan"))
            if math.isfinite(best) and (value >= best if lower_is_better else value <= best):
                return False
        client.set_registered_model_alias(name, CHAMPION, version)
    except MlflowException as err:
        raise McdmError(f"registry {uri}: {name} v{version}: {str(err).splitlines()[0]}") from None
    return True


def promote_by_metric(params, version: str | int, value: float, uri: Optional[str] = None) -> bool:
    return promote(params.registry.name, version, params.registry.primary_metric, value,
                   lower_is_better=params.registry.lower_is_better, uri=uri)


def download_model(uri: str, tracking: Optional[str] = None) -> Path:
    """``models:/name@alias`` or ``models:/name/version`` -> the local folder MLflow downloads it to
    (``MLFLOW_TRACKING_URI``, else the project's sqlite store); a one-line error when it cannot."""
    import mlflow

    tracking = tracking or tracking_uri()
    if tracking.startswith("sqlite:///") and not Path(tracking.removeprefix("sqlite:///")).is_file():
        raise McdmError(f"{uri}: no MLflow store at {tracking} (outside the project, set MLFLOW_TRACKING_URI to "
                        "the registry's store, e.g. sqlite:////path/to/mcdm/mlflow.db)")
    try:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(tracking)
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as err:  # noqa: BLE001 -- any registry failure is one line for the user
        raise McdmError(f"{uri}: cannot download from the registry at {tracking} "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return Path(local)


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A registry URI (``models:/...``) downloaded to a local folder; any other path as it is."""
    return download_model(str(checkpoint)) if str(checkpoint).startswith("models:/") else Path(checkpoint)


def registry_aliases(name: str, tracking: Optional[str] = None) -> list[str]:
    """``models:/name@alias`` of every alias of ``name`` in the store (champion first); [] when there is
    no store or no such model (a listing, never an error)."""
    from mlflow import MlflowClient

    tracking = tracking or tracking_uri()
    if tracking.startswith("sqlite:///") and not Path(tracking.removeprefix("sqlite:///")).is_file():
        return []
    try:
        aliases = MlflowClient(tracking_uri=tracking, registry_uri=tracking).get_registered_model(name).aliases
    except Exception:  # noqa: BLE001 -- no model, no registry: nothing to list
        return []
    return [f"models:/{name}@{a}" for a in sorted(aliases, key=lambda a: (a != CHAMPION, a))]
