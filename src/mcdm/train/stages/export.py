"""What a stage exports (diffusers folders + stage.json) and the bundle stage 3 registers."""
from __future__ import annotations

import contextlib
from pathlib import Path

from mcdm.config import dump_params
from mcdm.media import layout
from mcdm.media.files import write_json
from mcdm.media.layout import AUDIO_TOKENS, DENOISER, LANDMARK_GUIDER, MOTION_PRIOR, STAGE_JSON
from mcdm.train.export import export_pretrained
from mcdm.train.stages.inputs import previous_output, stage_name
from mcdm.train.stages.task import StageTask


@contextlib.contextmanager
def _ema_weights(ema, parameters):
    """Swap the EMA weights in for the export, then put the trained ones back."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def export_stage(task: StageTask, out_dir: Path, rank: int, extra: dict, ema=None) -> Path:
    """``<out>/<component>/`` folders + ``stage.json`` (params hash); every rank calls it."""

    trained = [p for p in task.model.parameters() if p.requires_grad]
    with _ema_weights(ema, trained):
        out = export_pretrained(task.export_modules(), out_dir, rank=rank,
                                fp32_master=task.trains and ema is None)
    if rank == 0:
        p = task.params
        info = {"stage": task.stage, "name": stage_name(task.stage), "variant": p.variant, "seed": p.seed,
                "params_hash": p.hash(), "components": sorted(task.export_modules()), "ema": ema is not None,
                **task.stage_info(), **extra,
                "inputs": {"features": str(task.inputs.features), "base": str(task.inputs.base),
                           "motion_encoders": str(task.inputs.motion_encoders),
                           "prev": [str(x) for x in task.inputs.prev]},
                "fingerprint": task.fingerprint}
        write_json(info, Path(out) / STAGE_JSON)
    return Path(out)


def registry_bundle(task: StageTask, out_dir: Path, into: Path) -> Path:
    """What generation needs, in one folder (the registered model version; ``mcdm.pipelines.loading.load_from_bundle``
    reads it): stage 3's denoiser, stage 2's prior (or wo_fpc's audio tokens), stage 1's landmark
    guider, the base VAE, scheduler and ``encoders.json``, the motion encoders, every stage's
    ``stage.json`` (as ``stageN.json``) and the ``params.yaml`` that trained it."""
    import shutil

    prev1, _ = previous_output(task.inputs, 1)
    prev2, _ = previous_output(task.inputs, 2)
    sources = {DENOISER: out_dir / DENOISER, LANDMARK_GUIDER: prev1 / LANDMARK_GUIDER,
               "vae": task.inputs.base / layout.VAE, "scheduler": task.inputs.base / layout.SCHEDULER}
    for name in (MOTION_PRIOR, AUDIO_TOKENS):
        if (prev2 / name).is_dir():
            sources[name] = prev2 / name
    if task.inputs.motion_encoders is not None and task.inputs.motion_encoders.is_dir():
        sources["motion_encoders"] = task.inputs.motion_encoders
    for name, src in sources.items():
        shutil.copytree(src, into / name)
    shutil.copy2(task.inputs.base / layout.ENCODERS_JSON, into / layout.ENCODERS_JSON)
    for k, folder in ((1, prev1), (2, prev2), (3, out_dir)):
        shutil.copy2(folder / STAGE_JSON, into / f"stage{k}.json")

    (into / "params.yaml").write_text(dump_params(task.params))  # the params that trained it
    return into
