"""The registered model as an MLflow pyfunc (decisions.md #28): portrait bytes + speech bytes (+ seconds)
in, mp4 bytes out, so that

    model = mlflow.pyfunc.load_model("models:/mcdm-talkingface@champion")
    video = model.predict(pd.DataFrame({"portrait": [png], "audio": [wav], "seconds": [2.0]}))["video"][0]

generates, and ``mlflow models serve -m models:/mcdm-talkingface@champion --env-manager local`` answers
``{"dataframe_split": {"columns": ["portrait", "audio", "seconds"], "data": [[b64, b64, 2.0]]}}``
(binary columns as standard base64). The bundle stage 3 registers is the model's artifact
``bundle`` (``mcdm generate --checkpoint models:/...`` loads that folder); the video is what
:func:`mcdm.pipelines.render.render` writes for ``mcdm generate``. The class is pickled by
reference: loading it needs this package installed (``--env-manager local``).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from mcdm.config.generation import GenerationSettings
from mcdm.errors import McdmError
from mcdm.media.layout import PYFUNC_ARTIFACT
from mcdm.pipelines.loading import load_pipeline
from mcdm.pipelines.preprocessing import read_image, read_speech
from mcdm.pipelines.render import render

DEFAULT_SECONDS = 2.0
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "portrait"), ColSpec("binary", "audio"),
                   ColSpec("double", "seconds", required=False)]),
    outputs=Schema([ColSpec("binary", "video")]),
    params=ParamSchema([ParamSpec("seconds", "double", DEFAULT_SECONDS), ParamSpec("steps", "long", 0),
                        ParamSpec("seed", "long", 0), ParamSpec("crop_only", "boolean", False)]),
)
# what loading the model needs besides this package (not inferred: inference loads the model, slowly)
REQUIREMENTS = ["mlflow", "torch", "diffusers", "av", "pillow", "numpy", "pandas", "pyloudnorm", "opencv-python"]


def _row_seconds(row, default: float) -> float:
    value = row.get("seconds") if hasattr(row, "get") else None
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return default
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise McdmError(f"seconds: must be a finite number > 0 (got {value})")
    return value


class TalkingFaceModel(mlflow.pyfunc.PythonModel):
    """One pipeline loaded from the ``bundle`` artifact; each row of the input one video."""

    def load_context(self, context) -> None:
        self.pipe = load_pipeline(Path(context.artifacts[PYFUNC_ARTIFACT]))
        self.pipe.set_progress_bar_config(disable=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = {**{"seconds": DEFAULT_SECONDS, "steps": 0, "seed": 0, "crop_only": False}, **(params or {})}
        settings = GenerationSettings(crop_only=bool(params["crop_only"]))
        rate = int(self.pipe.data_params.audio_rate)
        videos = []
        with tempfile.TemporaryDirectory(prefix="mcdm-pyfunc-") as tmp:
            for i, row in enumerate(model_input.to_dict("records")):
                folder = Path(tmp) / str(i)
                folder.mkdir()
                (folder / "portrait").write_bytes(bytes(row["portrait"]))
                (folder / "audio").write_bytes(bytes(row["audio"]))
                try:
                    seconds = _row_seconds(row, float(params["seconds"]))
                    image = read_image(folder / "portrait")
                    speech = read_speech(folder / "audio", rate, seconds=seconds)
                    render(self.pipe, image, speech, folder / "video.mp4", settings=settings, seconds=seconds,
                           steps=int(params["steps"]) or None, seed=int(params["seed"]))
                except McdmError as err:  # the one line, as a bad request (HTTP 400 from `mlflow models serve`)
                    text = str(err).replace(f"{folder}{os.sep}", "")
                    raise MlflowException(f"row {i + 1}: {text}", error_code=INVALID_PARAMETER_VALUE) from None
                videos.append((folder / "video.mp4").read_bytes())
        return pd.DataFrame({"video": videos})


def log_pyfunc(bundle: str | Path, run_id: str, tracking_uri: str, name: str = "model"):
    """Log ``bundle`` as the pyfunc model of run ``run_id`` (a logged model of the run's experiment, its
    artifacts in that experiment's store); the :class:`mlflow.models.model.ModelInfo`."""
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    # created here: Model.log alone would file it under the global current experiment (Default, ./mlruns)
    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id,
                                       model_type="mcdm-talkingface")
    with warnings.catch_warnings():  # "An input example was not provided": one would run a generation here
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        return Model.log(None, mlflow.pyfunc, name=name, run_id=run_id, model_id=model.model_id,
                         python_model=TalkingFaceModel(),
                         artifacts={PYFUNC_ARTIFACT: str(bundle)}, signature=SIGNATURE,
                         pip_requirements=REQUIREMENTS)
