"""The loss curve and the EMA of a stage's run."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from mcdm.train.checkpoints import tag_for


class StepRecorder:
    """Stands in front of the MLflow tracker the engine reports to: keeps this run's loss curve (also
    in ``<checkpoints>/loss_history.csv`` at every checkpoint, so a resumed run has the whole curve),
    and updates the EMA after every optimizer step."""

    HISTORY = "loss_history.csv"

    def __init__(self, tracker, checkpoint_dir: Path, ema=None, parameters=None):
        self.tracker = tracker
        self.checkpoint_dir = Path(checkpoint_dir)
        self.ema = ema
        self.parameters = parameters
        self.rows: list[tuple[int, float]] = []
        self.speeds: list[float] = []

    @property
    def run_id(self):
        return getattr(self.tracker, "run_id", None)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if "loss" in metrics and "samples_per_s" in metrics:  # one optimizer step
            self.rows.append((int(step), float(metrics["loss"])))
            self.speeds.append(float(metrics["samples_per_s"]))
            if self.ema is not None:
                self.ema.step(self.parameters)
        self.tracker.log_metrics(metrics, step=step)

    def resumed(self, step: int, previous_run) -> None:
        path = self.checkpoint_dir / self.HISTORY
        if path.is_file():
            with path.open() as f:
                self.rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if int(r["step"]) <= step]
        if self.ema is not None:
            self._load_ema(step)
        self.tracker.resumed(step, previous_run)

    def on_checkpoint(self, engine, step: int) -> None:
        if getattr(engine, "global_rank", 0) != 0:
            return
        write_loss_csv(self.rows, self.checkpoint_dir / self.HISTORY)
        if self.ema is not None:
            from safetensors.torch import save_file

            folder = self.checkpoint_dir / tag_for(step)
            state = {f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.ema.shadow_params)}
            tmp = folder / ".ema.safetensors.tmp"
            save_file(state, str(tmp), metadata={"optimization_step": str(self.ema.optimization_step)})
            os.replace(tmp, folder / "ema.safetensors")

    def _load_ema(self, step: int) -> None:
        import warnings

        from safetensors import safe_open


        path = self.checkpoint_dir / tag_for(step) / "ema.safetensors"
        if not path.is_file():
            warnings.warn(f"{path} missing: the EMA restarts from the resumed weights", stacklevel=2)
            self.ema.shadow_params = [p.detach().clone() for p in self.parameters]
            return
        with safe_open(str(path), framework="pt") as f:
            self.ema.shadow_params = [f.get_tensor(f"shadow.{i}").to(p.device) for i, p in enumerate(self.parameters)]
            self.ema.optimization_step = int(f.metadata()["optimization_step"])

    def __getattr__(self, name):  # anything else the engine may call goes to the tracker
        return getattr(self.tracker, name)


def write_loss_csv(rows: list[tuple[int, float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows((s, f"{v:.6g}") for s, v in rows)
    os.replace(tmp, path)


def loss_summary(rows: list[tuple[int, float]]) -> dict[str, Any]:
    """Mean loss of the first and the last 10% of the steps (at least one step each)."""
    if not rows:
        return {"loss_first10": None, "loss_last10": None, "loss_fell": None}
    losses = [v for _, v in sorted(rows)]
    n = max(1, len(losses) // 10)
    first, last = float(np.mean(losses[:n])), float(np.mean(losses[-n:]))
    return {"loss_first10": first, "loss_last10": last, "loss_fell": bool(last < first)}
