"""The registered model as MLflow users load and serve it (issue #21 points 1 and 8): stage 3's
registration (``register_stage_model`` with ``log_pyfunc``) logs the model folder as a pyfunc with a
signature, ``champion`` is promoted, and then, against that sqlite store:

- ``mlflow.pyfunc.load_model("models:/mcdm-talkingface@champion")`` generates mp4 bytes;
- ``mcdm generate --checkpoint models:/mcdm-talkingface@champion`` runs from an empty folder and writes
  the portrait at its resolution;
- ``mlflow models serve`` (loopback, ``--env-manager local``) answers a request.

The folder is a tiny untrained pipeline: these tests pin the MLflow plumbing, not the model."""
from __future__ import annotations

import base64
import subprocess

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import skimage.data
from conftest import TINY_PIPELINE, free_port, run_cli, stop_session, tiny, tool_env, wait_for_http
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from mcdm.demo import Checkpoints, DemoSettings
from mcdm.media.io import probe, write_wav
from mcdm.pipelines.pyfunc import log_pyfunc
from mcdm.tracking.registry import promote_by_metric, registry_aliases
from mcdm.tracking.runs import PARENT_RUN_ENV, register_stage_model, stage_run
from mcdm.tracking.store import default_tracking_uri
from mcdm.train.builders import build_untrained_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "mcdm-talkingface"
CHAMPION = f"models:/{NAME}@champion"
PORTRAIT = skimage.data.astronaut()[:, 32:480]  # 448 x 512


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(folder of the inputs, tracking URI) with version 1 of the registered model aliased champion."""
    root = tmp_path_factory.mktemp("pyfunc")
    params = tiny(TINY_PIPELINE, tracking={"system_metrics": False})
    pipe = build_untrained_pipeline(params)
    pipe.save_pretrained(root / "folder")
    Image.fromarray(PORTRAIT).save(root / "face.png")
    t = np.arange(16000) / 16000
    write_wav(root / "speech.wav", (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)))
              .astype(np.float32))
    uri = default_tracking_uri(root)
    with pytest.MonkeyPatch.context() as mp:
        for key in (PARENT_RUN_ENV, "DVC_STAGE", "DVC_EXP_NAME", "RANK"):
            mp.delenv(key, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("DVC_ROOT", str(root))
        with stage_run(params, "train_stage3") as run:
            version = register_stage_model(run, params, root / "folder", log_pyfunc)
        assert version is not None and promote_by_metric(params, version, 1.0, uri=uri)
    return root, uri


@pytest.fixture
def registry(store, monkeypatch):
    root, uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return store


def _request(root) -> pd.DataFrame:
    return pd.DataFrame({"portrait": [(root / "face.png").read_bytes()], "audio": [(root / "speech.wav").read_bytes()],
                         "seconds": [0.4]})


def _video(data: bytes, tmp_path, name: str):
    path = tmp_path / name
    path.write_bytes(data)
    return probe(path)


def test_the_champion_is_a_logged_pyfunc_with_a_signature(registry):
    _, uri = registry
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(NAME, "champion")
    assert version.source.startswith("models:/m-")  # a "Logged models" entry, not a raw folder
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == version.run_id and logged.name == "model"
    assert logged.experiment_id == client.get_run(version.run_id).info.experiment_id  # not Default's ./mlruns
    info = mlflow.models.get_model_info(CHAMPION)
    assert "python_function" in info.flavors
    assert info.signature.inputs.input_names() == ["portrait", "audio", "seconds"]
    assert [c.type.name for c in info.signature.inputs.inputs] == ["binary", "binary", "double"]
    assert info.signature.outputs.input_names() == ["video"]


def test_pyfunc_load_model_generates_the_portrait_speaking(registry, tmp_path):
    root, _ = registry
    model = mlflow.pyfunc.load_model(CHAMPION)
    out = model.predict(_request(root))
    info = _video(out["video"][0], tmp_path, "full.mp4")
    assert (info.width, info.height, info.n_frames, info.has_audio) == (448, 512, 10, True)
    crop = model.predict(_request(root).drop(columns="seconds"), params={"seconds": 0.2, "crop_only": True})
    assert (lambda i: (i.width, i.n_frames))(_video(crop["video"][0], tmp_path, "crop.mp4")) == (64, 5)
    bad = _request(root).assign(portrait=[b"this is a text file, not a picture\n"])
    with pytest.raises(MlflowException, match=r"^row 1: portrait: cannot read the image"):
        model.predict(bad)


def test_generate_from_an_empty_folder_with_the_registered_champion(registry, tmp_path, monkeypatch, capsys):
    root, _ = registry
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run_cli(capsys, "generate", "--ref", root / "face.png", "--audio", root / "speech.wav",
                             "--out", "talk.mp4", "--seconds", "0.4", "--checkpoint", CHAMPION)
    assert code == 0, err
    info = probe(work / "talk.mp4")
    assert (info.width, info.height, info.n_frames, info.has_audio) == (448, 512, 10, True)
    assert "448x512 full frame" in out
    assert sorted(p.name for p in work.iterdir()) == ["talk.mp4"]


def test_mlflow_models_serve_answers_a_request_on_loopback(registry, tmp_path):
    root, uri = registry
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", CHAMPION, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              cwd=tmp_path, env=tool_env(MLFLOW_TRACKING_URI=uri), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log", status=200)
        b64 = [base64.b64encode((root / n).read_bytes()).decode() for n in ("face.png", "speech.wav")]
        body = {"dataframe_split": {"columns": ["portrait", "audio", "seconds"], "data": [[*b64, 0.4]]}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert answer.status_code == 200, answer.text[:2000]
        video = base64.b64decode(answer.json()["predictions"][0]["video"])
        info = _video(video, tmp_path, "served.mp4")
        assert (info.width, info.height, info.n_frames, info.has_audio) == (448, 512, 10, True)
        bad = {"dataframe_split": {"columns": ["portrait", "audio"], "data": [[base64.b64encode(b"text").decode(),
                                                                             b64[1]]]}}
        refused = requests.post(f"http://127.0.0.1:{port}/invocations", json=bad, timeout=60)
        assert refused.status_code == 400 and (
            "Error: row 1: portrait: cannot read the image" in refused.json()["message"])
    finally:
        stop_session(server, timeout=20)  # the server we started (uvicorn and its worker), by its pid
        log.close()


def test_the_demo_lists_every_alias_of_the_registered_model(registry, tmp_path):
    _, uri = registry
    aliases = [f"models:/{NAME}@champion", f"models:/{NAME}@candidate"]  # champion first
    assert registry_aliases(NAME, uri) == aliases
    assert registry_aliases(NAME, f"sqlite:///{tmp_path / 'none.db'}") == [] and not (tmp_path / "none.db").exists()
    assert registry_aliases("no-such-model", uri) == []
    assert Checkpoints(DemoSettings(checkpoint="models")).choices() == ["models", *aliases]  # MLFLOW_TRACKING_URI
