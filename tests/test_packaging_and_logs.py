"""Packaging and logs (issue #21 point 10): the runtime dependencies are what the code uses (pytest and
selenium only in the ``test`` extra; nothing declared and unused), and DeepSpeed's "Attempting to get
learning rate" warning, which users cannot act on, does not reach them while its other messages do."""
from __future__ import annotations

import ast
import importlib.metadata as md
import logging
import re
import tomllib

import torch
from conftest import ROOT

from mcdm.logs import configure

# declared but never imported by name, each for a reason
NOT_IMPORTED = {
    "fastapi": "an upper bound for prefect's server (newer releases break it)",
    "dvc": "the pipeline's command line (dvc repro), not a library",
    "pyarrow": "pandas' parquet engine",
    "dlib-bin": "ships the `dlib` module (face/dlib.py imports it; the wheel's file is _dlib_pybind11)",
    "face_recognition_models": "dlib's model files, found by importlib.util.find_spec",
    "setuptools": "face_recognition_models reads its files through pkg_resources",
}


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[; ~]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_modules() -> set[str]:
    found = set()
    for path in [p for folder in ("src", "benchmarks", "flows") for p in (ROOT / folder).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_test_tools_are_an_extra_and_every_runtime_dependency_is_used():
    project = _project()
    runtime = {_name(r) for r in project["dependencies"]}
    assert {_name(r) for r in project["optional-dependencies"]["test"]} == {"pytest", "selenium"}
    assert not runtime & {"pytest", "selenium", "accelerate", "torchmetrics", "playwright"}
    modules = {}
    for module, dists in md.packages_distributions().items():
        for dist in dists:
            modules.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    imported = _imported_modules()
    unused = sorted(d for d in runtime - {n.replace("_", "-") for n in NOT_IMPORTED}
                    if not modules.get(d, set()) & imported)
    assert not unused, f"declared in pyproject.toml, imported nowhere in src/, benchmarks/ or flows/: {unused}"
    assert {n.replace("_", "-") for n in NOT_IMPORTED} <= runtime  # the exceptions are still declared


def test_deepspeed_learning_rate_noise_is_dropped_and_its_other_warnings_kept():
    from deepspeed.runtime.lr_schedules import WarmupLR

    configure("info")
    seen: list[str] = []
    handler = logging.Handler()  # on DeepSpeed's own logger: its stream handler may hold an old sys.stdout
    handler.emit = lambda record: seen.append(record.getMessage())
    deepspeed_logger = logging.getLogger("DeepSpeed")
    deepspeed_logger.addHandler(handler)
    try:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        for _ in range(3):
            WarmupLR(optimizer, warmup_num_steps=10, last_batch_iteration=-1)  # reads the rate before step 1
        deepspeed_logger.warning("a DeepSpeed warning users can act on")
    finally:
        deepspeed_logger.removeHandler(handler)
    assert not [m for m in seen if "Attempting to get learning rate" in m], seen
    assert "a DeepSpeed warning users can act on" in seen
