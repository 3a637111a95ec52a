"""An evaluation in MLflow: its own run, its numbers on the registered version's run, and the
``champion`` alias moved by ``registry.primary_metric`` (main line only, decisions.md #16)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from mcdm.config import Params
from mcdm.errors import McdmError
from mcdm.media.layout import MODELS_LAYOUT, STAGE_JSON
from mcdm.tracking import runs as tracking
from mcdm.tracking.registry import promote_by_metric


# ---------------------------------------------------------------------------------------------- tracking
def numeric_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Finite numbers of (nested) metrics.json, keys joined with '.' (what MLflow records)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(numeric_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


def _stage3_info(models_dir: str | Path) -> dict:
    path = Path(models_dir) / Path(MODELS_LAYOUT["denoiser"][0]).parent / STAGE_JSON
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _model_version(client, params: Params, stage3: dict) -> tuple[Optional[str], Optional[str]]:
    """The registered version of this stage-3 output and its run: ``stage.json``'s ``model_version``,
    else the newest version logged by its ``run_id``, else the newest tagged with its ``params_hash``."""
    name = params.registry.name
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # noqa: BLE001 -- no registry (yet): nothing to promote
        return None, None
    by_number = {str(v.version): v for v in versions}
    if str(stage3.get("model_version")) in by_number:
        v = by_number[str(stage3["model_version"])]
        return str(v.version), v.run_id
    for match in (lambda v: stage3.get("run_id") and v.run_id == stage3["run_id"],
                  lambda v: v.tags.get("params_hash") == stage3.get("params_hash", params.hash())):
        hits = sorted((v for v in versions if match(v)), key=lambda v: int(v.version))
        if hits:
            return str(hits[-1].version), hits[-1].run_id
    return None, None


def track_evaluation(params: Params, metrics: dict, models_dir: str | Path, artifacts: list[str | Path], *,
                     stage: str = "evaluate", prefix: str = "eval.", promote: bool = True) -> dict:
    """Log an evaluation to MLflow: a ``stage`` run (``metrics``' numbers as run metrics: evaluations
    pass their headline, ``mcdm.eval.metric_files``, so the run table stays small; the reports, details
    included, as artifacts); the same numbers also on the stage-3 run of the registered version, named
    ``<prefix><metric>``; then, with ``promote``, ``champion`` moves by ``registry.primary_metric``
    (main line only, decisions.md #16). The open_set stage logs through here too (prefix
    ``open_set.``, no promotion). Returns what was done."""
    import warnings

    numbers = numeric_metrics(metrics)
    stage3 = _stage3_info(models_dir)
    done: dict = {}
    with tracking.stage_run(params, stage, tags={"stage3_run_id": stage3.get("run_id", "")}) as tracker:
        tracker.log_metrics(numbers, step=0)
        for path in artifacts:
            if Path(path).exists():
                tracker.log_artifact(path, stage)
        done["run_id"] = tracker.run_id
    if not tracking.is_main_line(params):
        done["promotion"] = "not the main line (variant full at the default alpha): no registry update"
        return done
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri = tracking.tracking_uri()
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        version, run_id = _model_version(client, params, stage3)
        if version is None:
            done["promotion"] = f"no registered version of {params.registry.name} for this stage-3 output"
            return done
        ts = int(time.time() * 1000)
        items = [Metric(f"{prefix}{k}", v, ts, 0) for k, v in numbers.items()]
        for i in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[i:i + 1000])
        done["version"] = version
        if not promote:
            done["promotion"] = f"metrics logged on version {version} as {prefix}*; no promotion from {stage}"
            return done
        value = metrics.get(params.registry.primary_metric)
        if value is None:
            done["promotion"] = f"{params.registry.primary_metric} is not available: version {version} not ranked"
            return done
        champion = promote_by_metric(params, version, float(value), uri=uri)
        done["champion"] = champion
        done["promotion"] = f"version {version} {'is now' if champion else 'stays'} " \
                            f"{'champion' if champion else 'candidate'} ({params.registry.primary_metric} {value:.4g})"
    except McdmError as err:
        warnings.warn(f"registry: {err}", tracking.TrackingUnavailable, stacklevel=2)
        done["promotion"] = f"failed: {err}"
    except Exception as err:  # noqa: BLE001 -- the evaluation is written; a registry outage must not undo it
        warnings.warn(f"registry at {uri} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                      tracking.TrackingUnavailable, stacklevel=2)
        done["promotion"] = f"failed: {type(err).__name__}"
    return done
