"""MLflow dashboard in a real browser: `make mlflow-ui`'s service over a store filled by a short
training run, opened in headless Chromium (Debian's chromium + chromedriver, driven by selenium).
Finds the stage runs, a metric chart and the registered model version; saves a screenshot that the
README shows (docs/mlflow_ui.png)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from conftest import browser, docs_screenshot, free_port, screenshot_on_failure


def _short_training_run(project: Path) -> tuple[str, list[str]]:
    """Three stage runs under one parent, each a real (tiny) optimisation logging its loss, and a
    registered model version — what the pipeline's stages log, on a toy model."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    from mcdm.config import Params
    from mcdm.tracking.runs import register_stage_model, stage_run, start_parent_run

    class Toy(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width: int = 8):
            super().__init__()
            self.lin = torch.nn.Linear(width, width)

    params = Params()
    os.environ["MCDM_PARENT_RUN_ID"] = start_parent_run(project, "train-all")
    run_ids = []
    try:
        torch.manual_seed(0)
        x = torch.randn(64, 8)
        for stage in ("train_stage1", "train_stage2", "train_stage3"):
            model = Toy()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            with stage_run(params, stage) as tracker:
                for step in range(30):
                    loss = ((model.lin(x) - x.flip(1)) ** 2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    tracker.log_metrics({"loss": loss.item()}, step=step)
                tracker.flush()
                run_ids.append(tracker.run_id)
                if stage == "train_stage3":
                    out = project / "models" / "stage3"
                    model.save_pretrained(out)
                    version = register_stage_model(tracker, params, out)
                    assert version is not None
    finally:
        os.environ.pop("MCDM_PARENT_RUN_ID", None)
    return params.registry.name, run_ids


def _training_view(driver, By) -> None:
    """MLflow 3's "Model training" view rather than its GenAI one, without the assistant's panel (best
    effort: the screenshot's framing, not what the test checks)."""
    for xpath in ("//*[normalize-space(text())='Model training']",
                  "//*[contains(text(), 'MLflow Assistant')]/following::button[@aria-label='Close'][1]"):
        for element in driver.find_elements(By.XPATH, xpath)[:1]:
            try:
                element.click()
            except Exception:  # noqa: BLE001 -- not clickable in this MLflow version: keep its default view
                pass


def test_mlflow_ui_shows_stage_runs_metric_chart_and_model_version(tmp_path, monkeypatch):
    driver = browser()
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from mcdm.services import start, stop

    project = tmp_path / "proj"
    (project / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(project)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_name, run_ids = _short_training_run(project)
    exp_id = MlflowClient(uri).get_run(run_ids[0]).info.experiment_id

    port = free_port()
    run_dir = tmp_path / "run"
    start("mlflow-ui", port, run_dir, project, timeout=420)
    wait = WebDriverWait(driver, 90)
    base = f"http://127.0.0.1:{port}"
    try:
        with screenshot_on_failure(driver, tmp_path):
            # 1. experiments page: the pipeline's parent run (its stage runs are nested under it)
            driver.get(f"{base}/#/experiments/{exp_id}/runs")
            wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(text(), 'train-all')]")))
            _training_view(driver, By)
            time.sleep(2)
            shot = tmp_path / "mlflow_ui.png"
            driver.save_screenshot(str(shot))
            # 2. each stage run, and a metric chart of the loss (plotly svg or canvas)
            for stage, run_id in zip(("train_stage1", "train_stage2", "train_stage3"), run_ids):
                driver.get(f"{base}/#/experiments/{exp_id}/runs/{run_id}")
                wait.until(EC.presence_of_element_located((By.XPATH, f"//*[contains(text(), '{stage}')]")))
            driver.get(f"{base}/#/experiments/{exp_id}/runs/{run_ids[0]}/model-metrics")
            wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(text(), 'loss')]")))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.main-svg, canvas, .js-plotly-plot"))
            time.sleep(1)
            driver.save_screenshot(str(tmp_path / "mlflow_metrics.png"))
            # 3. the registered model and its version
            driver.get(f"{base}/#/models/{model_name}")
            wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Version 1')]")))
    finally:
        stop("mlflow-ui", run_dir)
    assert shot.stat().st_size > 10_000
    docs_screenshot(shot)
    docs_screenshot(tmp_path / "mlflow_metrics.png")
