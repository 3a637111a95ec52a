"""MLflow tracking against a real sqlite store (one per module: its first migration takes seconds):
nested stage runs with tags, params, metrics and artifacts; stages of one `dvc repro` sharing a
parent; registry versions and alias promotion; an unreachable server that warns once while the
training goes on."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, tool_env
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import save_file
from test_train_engine import (
    ToyData,
    _restore_torch_globals,  # noqa: F401 -- autouse: train_loop's global switches
    denoise_loss,
    make_model,
    make_spec,
)

from mcdm.config import Params
from mcdm.media.images import image_grid
from mcdm.media.io import write_video
from mcdm.tracking.backends import PIPELINE_TAG
from mcdm.tracking.registry import promote_by_metric
from mcdm.tracking.runs import PARENT_RUN_ENV, Tracker, register_stage_model, run_tags, stage_run, start_parent_run
from mcdm.tracking.store import TrackingUnavailable, default_tracking_uri, project_root, tracking_uri
from mcdm.train.engine import train_loop

RUN_ENV = (PARENT_RUN_ENV, "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "MLFLOW_TRACKING_URI", "RANK")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(project root, tracking URI) of a migrated sqlite store shared by the module's tests."""
    root = tmp_path_factory.mktemp("mlflow_project")
    uri = default_tracking_uri(root)
    MlflowClient(tracking_uri=uri).search_experiments()  # creates and migrates the database once
    return root, uri


@pytest.fixture
def env(monkeypatch, store):
    for key in RUN_ENV:
        monkeypatch.delenv(key, raising=False)
    root, uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(root))
    return monkeypatch


def _params(**overrides) -> Params:
    return Params.model_validate({"tracking": {"system_metrics": False}, **overrides})


def _runs(uri: str, where: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("mcdm")
    return client.search_runs([exp.experiment_id], filter_string=where)


def test_project_root_is_the_original_repo(tmp_path, monkeypatch):
    for key in RUN_ENV:
        monkeypatch.delenv(key, raising=False)
    repo = tmp_path / "repo"
    inside_exp = repo / ".dvc" / "tmp" / "exps" / "tmpk3j2" / "src"  # a `dvc exp run --temp` workspace
    inside_exp.mkdir(parents=True)
    assert project_root(inside_exp) == repo
    (repo / "a" / "b").mkdir(parents=True)
    assert project_root(repo / "a" / "b") == repo  # nearest folder with .dvc

    main = tmp_path / "main"
    main.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"], ["worktree", "add", "-q", str(tmp_path / "wt")]):
        subprocess.run(git + cmd, cwd=main, check=True, capture_output=True)
    assert project_root(tmp_path / "wt") == main  # a linked worktree: the store of the main one

    monkeypatch.setenv("DVC_ROOT", str(repo))  # what DVC exports to every stage command
    assert project_root() == repo
    assert tracking_uri() == default_tracking_uri() == f"sqlite:///{repo}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_stage_runs_nest_under_the_flow_run_with_tags_params_metrics_artifacts(env, store, tmp_path):
    root, uri = store
    parent = start_parent_run(root, "train-all")
    env.setenv(PARENT_RUN_ENV, parent)
    params = Params.model_validate({"seed": 3, "tracking": {"system_metrics_interval": 0.2}})
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    video = write_video(tmp_path / "clip.mp4", frames, fps=25.0)
    with stage_run(params, "train_stage1") as run:
        for step in range(1, 6):
            run.log_metrics({"loss": 1.0 / step, "lr": 1e-4}, step=step)
        run.log_image_grid(frames)
        run.log_video(video)
        assert run.parent_run_id == parent
        time.sleep(1.0)  # a few system-metrics samples
    with stage_run(_params(seed=3), "train_stage2") as second:
        second.log_metrics({"loss": 0.5}, step=1)
    with pytest.raises(RuntimeError), stage_run(_params(), "train_stage3") as failing:
        raise RuntimeError("boom")

    client = MlflowClient(tracking_uri=uri)
    children = {r.data.tags["stage"]: r for r in _runs(uri, f"tags.mlflow.parentRunId = '{parent}'")}
    assert set(children) == {"train_stage1", "train_stage2", "train_stage3"}
    first = children["train_stage1"]
    for key, value in {"stage": "train_stage1", "variant": "full", "seed": "3", "alpha": "0.1",
                       "params_hash": params.hash()}.items():
        assert first.data.tags[key] == value
    assert first.data.tags["git_rev"]
    assert first.data.params["train.stage1.lr"] == str(params.train.stage1.lr)
    assert first.data.params["model.block_out_channels"] == "[32, 64]"
    assert first.data.params["alpha"] == "0.1"
    history = client.get_metric_history(first.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 1.0 / s) for s in range(1, 6)]
    assert any(k.startswith("system/") for k in first.data.metrics)
    listed = {a.path for a in client.list_artifacts(first.info.run_id, "samples")}
    assert listed == {"samples/samples.png", "samples/clip.mp4"}
    png = client.download_artifacts(first.info.run_id, "samples/samples.png", str(tmp_path / "dl"))
    assert np.array_equal(np.asarray(Image.open(png)), image_grid(frames))
    assert Path(first.info.artifact_uri.removeprefix("file://")).is_relative_to(root / "mlartifacts")
    assert first.info.status == "FINISHED" and children["train_stage3"].info.status == "FAILED"
    assert failing.run_id == children["train_stage3"].info.run_id
    assert client.get_run(parent).info.status == "FAILED"  # follows its latest stage


def test_stages_of_one_dvc_repro_share_a_parent(env, store, tmp_path):
    root, uri = store
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "stage.py").write_text(textwrap.dedent("""\
        import json, sys
        from mcdm.config import Params
        from mcdm.tracking.store import project_root
        from mcdm.tracking.runs import stage_run

        with stage_run(Params.model_validate({"tracking": {"system_metrics": False}}), sys.argv[1]) as run:
            json.dump({"run": run.run_id, "root": str(project_root())}, open(sys.argv[1] + ".json", "w"))
        """))
    (proj / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          first:
            cmd: {sys.executable} stage.py first
            outs: [first.json]
          second:
            cmd: {sys.executable} stage.py second
            deps: [first.json]
            outs: [second.json]
        """))
    dvc_env = tool_env(MLFLOW_TRACKING_URI=uri, DVC_NO_ANALYTICS="1")
    for key in (PARENT_RUN_ENV, "DVC_ROOT"):
        dvc_env.pop(key, None)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=proj, env=dvc_env, check=True)
    done = subprocess.run(["dvc", "repro"], cwd=proj, env=dvc_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(tracking_uri=uri)
    first, second = (client.get_run(json.loads((proj / f"{s}.json").read_text())["run"]) for s in ("first", "second"))
    assert json.loads((proj / "first.json").read_text())["root"] == str(proj)  # DVC_ROOT
    parent = first.data.tags["mlflow.parentRunId"]
    assert second.data.tags["mlflow.parentRunId"] == parent
    assert (first.data.tags["dvc_stage"], second.data.tags["dvc_stage"]) == ("first", "second")
    parent_run = client.get_run(parent)
    assert PIPELINE_TAG in parent_run.data.tags and parent_run.data.tags["stage"] == "pipeline"
    assert parent_run.info.status == "FINISHED"

    with stage_run(_params(), "by_hand") as alone:  # outside DVC and Prefect: a top-level run
        pass
    assert "mlflow.parentRunId" not in client.get_run(alone.run_id).data.tags


def test_registry_versions_carry_tags_and_promotion_moves_aliases(env, store, tmp_path):
    _, uri = store
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, model / "diffusion_pytorch_model.safetensors")
    name = "mcdm-test-registry"
    main = _params(registry={"name": name, "primary_metric": "fvd"})

    versions = []
    for _ in range(3):
        with stage_run(main, "train_stage3") as run:
            versions.append(register_stage_model(run, main, model))
    with stage_run(_params(variant="wo_fa"), "train_stage3") as run:
        assert register_stage_model(run, _params(variant="wo_fa"), model) is None  # ablations never register
    assert register_stage_model(None, _params(alpha=0.5), model) is None  # nor alpha sweeps

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    v1, v2, v3 = versions
    assert [int(v) for v in versions] == sorted(int(v) for v in versions)
    tags = client.get_model_version(name, v1).tags
    assert (tags["variant"], tags["alpha"]) == ("full", "0.1")
    assert str(client.get_model_version_by_alias(name, "candidate").version) == v3
    assert promote_by_metric(main, v1, 10.0, uri=uri) is True
    assert promote_by_metric(main, v2, 12.0, uri=uri) is False  # worse fvd: champion stays
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    assert promote_by_metric(main, v3, 8.0, uri=uri) is True
    assert str(client.get_model_version_by_alias(name, "champion").version) == v3
    assert client.get_model_version(name, v2).tags["fvd"] == "12.0"


def test_unreachable_server_warns_once_and_training_goes_on(env, store, tmp_path):
    root, uri = store
    dead = f"http://127.0.0.1:{free_port()}"
    env.setenv("MLFLOW_TRACKING_URI", dead)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with stage_run(_params(), "train_stage1") as run:
            result = train_loop(make_model(), denoise_loss, ToyData(), make_spec(tmp_path / "ck", steps=4, every=2),
                                tracker=run)
            run.log_image_grid(np.zeros((2, 4, 4, 3), dtype=np.uint8))
    ours = [w for w in caught if issubclass(w.category, TrackingUnavailable)]
    assert len(ours) == 1 and dead in str(ours[0].message)
    assert result.steps == 4
    local = MlflowClient(tracking_uri=uri).get_run(run.run_id)  # continued in the project's local store
    assert local.data.tags["mcdm.offline_from"] == dead and local.info.status == "FINISHED"
    assert [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run.run_id, "loss")] == [1, 2, 3, 4]


def test_a_resumed_stage_tags_its_run_and_closes_the_killed_one(env, store, tmp_path):
    _, uri = store
    params = _params()
    killed = Tracker(stage="train_stage1", experiment="mcdm", tags=run_tags(params, "train_stage1"), params={})
    train_loop(make_model(), denoise_loss, ToyData(), make_spec(tmp_path / "ck", steps=2, every=2), tracker=killed)
    # ... the process dies here: its run is never closed
    with stage_run(params, "train_stage1") as run:
        result = train_loop(make_model(), denoise_loss, ToyData(), make_spec(tmp_path / "ck", steps=4, every=2),
                            tracker=run)
    assert result.resumed_from == 2
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(killed.run_id).info.status == "KILLED"
    tags = client.get_run(run.run_id).data.tags
    assert (tags["resumed_from_step"], tags["resumed_from_run"]) == ("2", killed.run_id)
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [3, 4]


def test_without_any_store_records_go_to_jsonl(env, tmp_path):
    (tmp_path / "mlflow.db").mkdir()  # the local sqlite store cannot open either
    env.setenv("DVC_ROOT", str(tmp_path))
    env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with stage_run(_params(), "train_stage1") as run:
            run.log_metrics({"loss": 0.25}, step=7)
    assert len([w for w in caught if issubclass(w.category, TrackingUnavailable)]) == 1
    records = [json.loads(line) for line in next((tmp_path / "logs" / "mlflow-offline").glob("*.jsonl")).open()]
    assert records[0]["kind"] == "start" and records[0]["tags"]["stage"] == "train_stage1"
    assert {"kind": "metric", "key": "loss", "value": 0.25, "step": 7}.items() <= records[-2].items()
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "FINISHED"
    assert run.run_id.startswith("offline-")


def test_image_grid_tiles_frames_row_major():
    frames = np.random.default_rng(1).random((5, 3, 2, 4))  # (N, C, H, W) floats in [0, 1]
    grid = image_grid(frames, ncols=3)
    assert grid.shape == (2 * 2, 3 * 4, 3) and grid.dtype == np.uint8
    as_uint8 = np.round(np.transpose(frames, (0, 2, 3, 1)) * 255).astype(np.uint8)
    for i in range(6):
        r, c = divmod(i, 3)
        cell = grid[r * 2:(r + 1) * 2, c * 4:(c + 1) * 4]
        assert np.array_equal(cell, as_uint8[i] if i < 5 else np.zeros_like(cell))
