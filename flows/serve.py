"""Serve every deployment from one process: `python flows/serve.py` (started by `make prefect-up`).

Deployments are defined once, here; the work-pool path deploys the same definitions with
`python flows/deploy.py --pool NAME` (`flow.deploy`), so no YAML repeats them.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import ablations, data_prep, evaluate, train_all  # noqa: E402


def deployments():
    return [
        train_all.to_deployment(name="local", concurrency_limit=1, tags=["mcdm"]),
        data_prep.to_deployment(name="local", concurrency_limit=1, tags=["mcdm"]),
        evaluate.to_deployment(name="local", concurrency_limit=1, tags=["mcdm"]),
        ablations.to_deployment(name="local", concurrency_limit=1, tags=["mcdm"]),
        # nightly full retrain, created paused: `prefect deployment schedule resume ...` to enable
        train_all.to_deployment(name="nightly", cron="0 2 * * *", paused=True, tags=["mcdm", "nightly"]),
    ]


if __name__ == "__main__":
    from prefect import serve

    serve(*deployments())
