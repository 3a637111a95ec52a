"""The three MCDM training stages on synthetic feature files (the features stage's keys), a random
tiny base UNet / VAE and untrained motion encoders, through the real DeepSpeed engine and MLflow:
per stage, exactly the parameters of decisions.md #4 receive gradients and change while every other
weight stays bitwise equal; the stages chain through their exports; bad input is one line."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_TRAINING, tiny
from mlflow import MlflowClient
from test_train_engine import _restore_torch_globals  # noqa: F401 -- autouse: train_loop's global switches

from mcdm.config import Params
from mcdm.errors import McdmError
from mcdm.media.layout import DENOISER, LANDMARK_GUIDER, MOTION_PRIOR
from mcdm.models.denoiser import MCDMDenoiser
from mcdm.train.datasets import ClipRuns, archived_indices, load_feature_set
from mcdm.train.stages.denoiser_stages import denoiser_for_stage3
from mcdm.train.stages.run import build_task, run_stage
from mcdm.train.synthetic import inputs_for, write_project

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RES, LATENT, AUDIO_DIM, REF_DIM = 32, 4, 80, 144


def tiny_params(**overrides) -> Params:
    return tiny(TINY_TRAINING, **overrides)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcdm_train")
    params = tiny_params()
    return write_project(root, params, res=RES, latent=LATENT, audio_dim=AUDIO_DIM, ref_dim=REF_DIM)


@pytest.fixture(scope="module")
def tracking(project):
    """A sqlite MLflow store inside the project (migrated once for the module)."""
    from mcdm.tracking.store import default_tracking_uri

    uri = default_tracking_uri(project)
    MlflowClient(tracking_uri=uri).search_experiments()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MCDM_PARENT_RUN_ID", "DVC_STAGE", "DVC_EXP_NAME", "RANK"):
            mp.delenv(key, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("DVC_ROOT", str(project))
        yield uri


@pytest.fixture(scope="module")
def stage1_untrained(project):
    """What stage 1 exports, without its training (for the tests of stages 2-3 inputs)."""
    folder = project / "untrained" / "stage1"
    task = build_task(tiny_params(), 1, inputs_for(project, 1), show_progress=False)
    for name, module in task.export_modules().items():
        module.save_pretrained(folder / name)
    (folder / "stage.json").write_text(json.dumps({"stage": 1, "variant": "full"}))
    return folder


# --------------------------------------------------------------------------------------------------
# Helpers: what gets gradients, what changes


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def gradient_names(task) -> set[str]:
    """Parameters that receive a gradient from one plain (non-DeepSpeed) backward of the stage loss."""
    batch = task.dataset.fixed_items(2)
    task.model.zero_grad(set_to_none=True)
    task.model(batch).backward()
    names = {n for n, p in task.model.named_parameters() if p.grad is not None}
    task.model.zero_grad(set_to_none=True)
    return names


def assert_only_trainable_changed(before: dict, model: torch.nn.Module, trainable: set[str]) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    unchanged_trainable = [k for k in trainable if torch.equal(before[k], after[k])]
    assert not unchanged_trainable, f"trained but unchanged: {unchanged_trainable[:5]}"
    changed_frozen = [k for k in before if k not in trainable and not torch.equal(before[k], after[k])]
    assert not changed_frozen, f"frozen but changed: {changed_frozen[:5]}"


def expected_denoiser(task, stage: int) -> set[str]:
    return {f"parts.{DENOISER}.{n}" for n in task.parts[DENOISER].trainable_parameter_names(stage)}


# --------------------------------------------------------------------------------------------------


def test_clip_runs_cut_present_and_archived_frames(project):
    features = load_feature_set(project / "data" / "features", show_progress=False)
    assert [v.clip_id for v in features.videos] == ["clip0", "clip1", "clip2"]  # the train split only
    runs = ClipRuns(features, clip_frames=4, archived_frames=3, clips_per_run=2)
    assert len(runs) == 3 * len(range(0, 24 - 8 + 1, 2))
    video = features.videos[0]
    frames = video.read(("latents", "landmarks"), 0, video.n_frames)
    latents = frames["latents"]
    item = runs[1]  # video 0, start 2: present frames 2..5 and 6..9; archived [ref, 0, 1] and [3, 4, 5]
    assert item["latents"].shape == (2, 4, 4, LATENT, LATENT)
    torch.testing.assert_close(item["latents"][1, :, 0], latents[6], rtol=0, atol=0)
    torch.testing.assert_close(item["ref_latent"], latents[0], rtol=0, atol=0)
    assert archived_indices(2, 3).tolist() == [-1, 0, 1]
    torch.testing.assert_close(item["archived_latents"][0], torch.stack([latents[0], latents[0], latents[1]]),
                               rtol=0, atol=0)
    torch.testing.assert_close(item["archived_latents"][1], latents[3:6], rtol=0, atol=0)
    assert item["landmark_images"].shape == (2, 4, 1, RES, RES) and item["audio"].shape == (2, 4, AUDIO_DIM)
    # the heat map peaks where a landmark is
    x, y = frames["landmarks"][6, 30].round().long().tolist()
    assert item["landmark_images"][1, 0, 0, y, x] > 0.9
    with pytest.raises(McdmError, match="no training video has the 32 frames"):
        ClipRuns(features, clip_frames=16, archived_frames=3, clips_per_run=2)


def test_stages_train_exactly_their_parameters_and_chain(project, tracking):
    params = tiny_params()
    models = project / "models"

    # stage 1: archived-clip prior, archived attention, spatial layers, landmark guider
    task1 = build_task(params, 1, inputs_for(project, 1), show_progress=False)
    trainable1 = set(task1.trainable)
    guider1 = {f"parts.{LANDMARK_GUIDER}.{n}" for n, _ in task1.parts[LANDMARK_GUIDER].named_parameters()}
    assert trainable1 == expected_denoiser(task1, 1) | guider1
    assert not any(".attn_present." in n or ".attn_temporal." in n for n in trainable1)
    assert gradient_names(task1) == trainable1
    before = state(task1.model)
    m1 = run_stage(params, 1, inputs_for(project, 1), models / "stage1", project / "ck" / "stage1",
                   project / "reports" / "train_stage1.json", project / "reports" / "train_stage1_loss.csv",
                   task=task1, show_progress=False)
    assert_only_trainable_changed(before, task1.model, trainable1)
    assert m1["steps"] == 4 and m1["samples_per_s"] > 0 and m1["peak_rss_mb"] > 0
    assert sorted(p.name for p in (models / "stage1").iterdir()) == ["denoiser", "landmark_guider", "stage.json"]
    info = json.loads((models / "stage1" / "stage.json").read_text())
    assert info["stage"] == 1 and info["params_hash"] == params.hash()
    curve = pd.read_csv(project / "reports" / "train_stage1_loss.csv")
    assert list(curve.columns) == ["step", "loss"] and curve["step"].tolist() == [1, 2, 3, 4]
    saved = json.loads((project / "reports" / "train_stage1.json").read_text())
    for key in ("loss_first10", "loss_last10", "steps", "wall_s", "samples_per_s", "peak_rss_mb",
                "fixed_batch_loss_start", "fixed_batch_loss_end"):
        assert saved[key] is not None, key

    # stage 2: the present-clip prior only; the stage-1 guider (landmark tokens) stays as it was
    task2 = build_task(params, 2, inputs_for(project, 2), show_progress=False)
    trainable2 = set(task2.trainable)
    assert trainable2 == {f"parts.{MOTION_PRIOR}.{n}" for n, _ in task2.parts[MOTION_PRIOR].named_parameters()}
    assert gradient_names(task2) == trainable2
    for name, p in task2.parts[LANDMARK_GUIDER].state_dict().items():  # loaded from stage 1's export
        assert torch.equal(p, task1.parts[LANDMARK_GUIDER].state_dict()[name]), name
    before = state(task2.model)
    m2 = run_stage(params, 2, inputs_for(project, 2), models / "stage2", project / "ck" / "stage2",
                   task=task2, show_progress=False)
    assert_only_trainable_changed(before, task2.model, trainable2)
    assert m2["loss_fell"] and m2["fixed_batch_loss_fell"], m2  # 30 steps from zero outputs: Eq. 3 falls
    assert (models / "stage2" / "motion_prior" / "config.json").is_file()

    # stage 3: ONLY the present-clip attention and the MTA, runs of 2 clips with memory carried
    task3 = build_task(params, 3, inputs_for(project, 3), show_progress=False)
    trainable3 = set(task3.trainable)
    assert trainable3 == expected_denoiser(task3, 3)
    assert trainable3 and all(".attn_present." in n or ".attn_temporal." in n for n in trainable3)
    assert gradient_names(task3) == trainable3
    # stage 1's weights arrive unchanged (the new layers were identity, so nothing else moved)
    stage1_weights = task1.parts[DENOISER].state_dict()
    for name, value in task3.parts[DENOISER].state_dict().items():
        assert torch.equal(value, stage1_weights[name]), name
    assert task3.parts[DENOISER].config.alpha == params.alpha
    before = state(task3.model)
    m3 = run_stage(params, 3, inputs_for(project, 3), models / "stage3", project / "ck" / "stage3",
                   project / "reports" / "train_stage3.json", task=task3, show_progress=False)
    assert_only_trainable_changed(before, task3.model, trainable3)
    assert m3["clips_per_s"] == pytest.approx(2 * m3["samples_per_s"])
    # the export loads alone (a full denoiser), and the main line registers a model version
    alone = MCDMDenoiser.from_pretrained(models / "stage3" / "denoiser")
    for name, value in alone.state_dict().items():
        assert torch.equal(value, task3.parts[DENOISER].state_dict()[name]), name
    assert m3["registered_version"] == "1"
    client = MlflowClient(tracking_uri=tracking)
    version = MlflowClient(tracking_uri=tracking, registry_uri=tracking).get_model_version(params.registry.name, "1")
    assert version.source.startswith("models:/m-")  # the bundle inside a logged pyfunc (decisions.md #28)
    runs = client.search_runs([client.get_experiment_by_name("mcdm").experiment_id], "tags.stage = 'train_stage3'")
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2, 3, 4]

    # a checkpoint folder of another variant is refused naming both (the engine's check, through a stage)
    with pytest.raises(McdmError, match=r"variant 'full', this run is variant 'wo_mta'; same shapes"):
        run_stage(tiny_params(variant="wo_mta", train={"stage3": {"steps": 6}}), 3, inputs_for(project, 3),
                  project / "wo_mta_stage3", project / "ck" / "stage3", show_progress=False)


def test_stage1_of_another_variant_or_shape_is_refused(stage1_untrained):
    folder = stage1_untrained / DENOISER
    with pytest.raises(McdmError, match=r"trained for variant 'full', this run is variant 'b1'.*missing in"):
        denoiser_for_stage3(tiny_params(variant="b1"), folder)
    with pytest.raises(McdmError, match=re.escape("archived_prior.queries: (2, 32) in") + r".*vs \(3, 32\) in this model"):
        denoiser_for_stage3(tiny_params(model={"num_queries": 3}), folder)
    ok = denoiser_for_stage3(tiny_params(variant="wo_fpc", alpha=0.5), folder)  # shares the main line's stage 1
    assert ok.config.model_variant == "wo_fpc" and ok.config.alpha == 0.5


def test_missing_inputs_name_the_stage_to_run(project, tmp_path, capsys):
    from mcdm.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_TRAINING))
    common = ["--params", str(params), "train", "--out", str(tmp_path / "out"), "--checkpoints", str(tmp_path / "ck"),
              "--base", str(project / "models" / "base"), "--motion-encoders", str(project / "models" / "motion_encoders")]
    cases = [
        (["--stage", "1", "--features", str(tmp_path / "nofeatures")], "run `dvc repro features` first"),
        (["--stage", "2", "--features", str(project / "data" / "features"), "--prev", str(tmp_path / "stage1")],
         "run `dvc repro train_stage1` first"),
        (["--stage", "3", "--features", str(project / "data" / "features"), "--prev", str(tmp_path / "stage1")],
         "run `dvc repro train_stage1` first"),
    ]
    for argv, expected in cases:
        assert main(common + argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(project, stage1_untrained, tracking,
                                                                         tmp_path, capsys):
    from mcdm.cli import main
    from mcdm.train.checkpoints import complete_checkpoints

    params = tmp_path / "params.yaml"
    from mcdm.config import deep_merge

    params.write_text(yaml.safe_dump(deep_merge(TINY_TRAINING, {"train": {"checkpoint_every": 1,
                                                                 "stage2": {"steps": 6, "lr": 1e30}}})))
    rc = main(["--params", str(params), "train", "--stage", "2", "--features", str(project / "data" / "features"),
               "--motion-encoders", str(project / "models" / "motion_encoders"),
               "--prev", str(stage1_untrained), "--out", str(tmp_path / "stage2"),
               "--checkpoints", str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    match = re.search(r"train_stage2: (loss|gradient norm) is \S+ at step (\d+); stopped \(the last good checkpoint "
                      r"is step (\d+)", err)
    assert match, err
    assert int(match.group(3)) == int(match.group(2)) - 1
    assert [s for s, _, _ in complete_checkpoints(tmp_path / "ck")][-1] == int(match.group(3))
    assert not (tmp_path / "stage2").exists() and not (tmp_path / "m.json").exists()


def test_rerunning_a_finished_stage_re_exports_and_exits_0(project, stage1_untrained, tracking, tmp_path, capsys):
    """A forced `dvc repro -f -s train_stage2`, or a kill after the last checkpoint: the checkpoints hold
    the final step, so the CLI re-exports the same weights and says so (it used to crash formatting None)."""
    from safetensors.torch import load_file

    from mcdm.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_TRAINING))
    argv = ["--params", str(params), "train", "--stage", "2", "--features", str(project / "data" / "features"),
            "--motion-encoders", str(project / "models" / "motion_encoders"), "--prev", str(stage1_untrained),
            "--out", str(tmp_path / "stage2"), "--checkpoints", str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.json")]
    assert main(argv) == 0
    first = load_file(tmp_path / "stage2" / "motion_prior" / "diffusion_pytorch_model.safetensors")
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "were done" in out and "re-exported without training" in out, out
    again = load_file(tmp_path / "stage2" / "motion_prior" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
