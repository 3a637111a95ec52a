"""Deploy the project's deployments to a Prefect process work pool: `python flows/deploy.py --pool NAME`.

The work-pool path of decisions.md #17: the deployments are the ones `flows/serve.py` serves
(``serve.DEPLOYMENTS``, defined once), loaded from this checkout with `flow.from_source` (local source:
no image, no git remote) and deployed with `prefect.deploy`; there is no prefect.yaml. Then

    prefect worker start --pool NAME        # on any machine that has the project at --project-dir
    prefect deployment run train-all/NAME --watch

Names: a served `local` deployment becomes `<pool>` (`train-all/NAME`), the others `<pool>-<name>`
(`train-all/NAME-nightly`, created paused as when served), so the pool's deployments never replace
the served ones on the same server. The pool is created as a `process` pool when missing.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import DEPLOYMENTS  # noqa: E402

from mcdm.errors import McdmError  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parents[1]
POOL_TYPE = "process"


def pool_deployment_name(name: str, pool: str) -> str:
    return pool if name == "local" else f"{pool}-{name}"


def entrypoint(flow) -> str:
    """`flows/pipeline.py:train_all`: the flow's file relative to the project, and its function."""
    source = Path(inspect.getsourcefile(flow.fn)).resolve()
    return f"{source.relative_to(PROJECT_DIR).as_posix()}:{flow.fn.__name__}"


def ensure_process_pool(pool: str) -> str:
    """Create the work pool ``pool`` (type process) when missing; refuse a pool of another type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
        if problem is not None:
            raise McdmError(f"cannot reach the Prefect API at {PREFECT_API_URL.value()} "
                              f"({type(problem).__name__}); start it with `make prefect-up` or set PREFECT_API_URL")
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type=POOL_TYPE, base_job_template=ProcessWorker.get_default_base_job_template()))
            return "created"
    if found.type != POOL_TYPE:
        raise McdmError(f"work pool {pool!r} is of type {found.type!r}; this project deploys local source "
                          f"to {POOL_TYPE!r} pools (choose another --pool)")
    return "exists"


def pool_deployments(pool: str, project_dir: Path):
    """serve.DEPLOYMENTS, each loaded from ``project_dir`` and renamed for ``pool``."""
    out = []
    for flow, name, options in DEPLOYMENTS:
        from_source = flow.from_source(source=str(project_dir), entrypoint=entrypoint(flow))
        out.append(from_source.to_deployment(name=pool_deployment_name(name, pool), **options))
    return out


def deploy(pool: str, project_dir: Path = PROJECT_DIR) -> list[str]:
    """Deploy every deployment to ``pool``; returns their `flow/deployment` names."""
    from prefect import deploy as prefect_deploy

    project_dir = Path(project_dir).resolve()
    if not (project_dir / "dvc.yaml").is_file():
        raise McdmError(f"--project-dir {project_dir}: not an mcdm project (no dvc.yaml)")
    state = ensure_process_pool(pool)
    print(f"work pool {pool!r} ({POOL_TYPE}): {state}")
    deployments = pool_deployments(pool, project_dir)
    prefect_deploy(*deployments, work_pool_name=pool, build=False, push=False,
                   print_next_steps_message=False, ignore_warnings=True)
    names = [f"{d.flow_name}/{d.name}" for d in deployments]
    for name in names:
        print(f"deployed {name} (source {project_dir})")
    print(f"next: `prefect worker start --pool {pool}`, then `prefect deployment run {names[0]} --watch`")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python flows/deploy.py", description=__doc__.splitlines()[0])
    p.add_argument("--pool", required=True, help="work pool name (created as a process pool when missing)")
    p.add_argument("--project-dir", type=Path, default=PROJECT_DIR,
                   help="the project checkout the workers run (default: this one); same path on every worker")
    args = p.parse_args(argv)
    try:
        deploy(args.pool, args.project_dir)
    except McdmError as err:
        print(f"deploy: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
