"""Serve every deployment from one process: `python flows/serve.py` (started by `make prefect-up`).

Deployments are defined once, here (``DEPLOYMENTS``); the work-pool path deploys the same definitions
with `python flows/deploy.py --pool NAME` (`flow.deploy` from this checkout), so no YAML repeats them.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import ablations, data_prep, evaluate, train_all  # noqa: E402

#: (flow, deployment name, deployment options): the one list of deployments
DEPLOYMENTS = [
    (train_all, "local", dict(concurrency_limit=1, tags=["mcdm"])),
    (data_prep, "local", dict(concurrency_limit=1, tags=["mcdm"])),
    (evaluate, "local", dict(concurrency_limit=1, tags=["mcdm"])),
    (ablations, "local", dict(concurrency_limit=1, tags=["mcdm"])),
    # nightly full retrain, created paused: `prefect deployment schedule resume ...` to enable
    (train_all, "nightly", dict(cron="0 2 * * *", paused=True, tags=["mcdm", "nightly"])),
]


def deployments():
    return [flow.to_deployment(name=name, **options) for flow, name, options in DEPLOYMENTS]


if __name__ == "__main__":
    from prefect import serve

    serve(*deployments())
