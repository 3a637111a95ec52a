"""The open-set table, the lip-token heatmap and the t-SNE of expression tokens (decisions.md #23).

Unit tests on hand-made inputs: the open-set aggregation (means per audio language and overall, the
reasons of missing values), the pair inputs read from feature files or, for a clip the features stage
rejected, from its crop and audio, the training frames of FID's real set, the loudness envelope, the
lip tokens sampled clip by clip, the bounded t-SNE perplexity, the figure writers, and the report's
open-set and token-figure sections (missing inputs listed). The stage wiring: neither stage is part of
the main line (``dvc repro evaluate``, train-all), the ablations flow runs both before the report.
Integration tests on the session's micro pipeline (``micro_pipeline``): the outputs exist with sane
content and report.md has the sections.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mcdm.config import Params, load_params
from mcdm.errors import McdmError
from mcdm.eval import open_set as O
from mcdm.eval import report
from mcdm.eval import token_figures as T

ROOT = Path(__file__).resolve().parents[1]


def _png_shape(path: Path) -> tuple[int, ...]:
    import matplotlib.image as mpimg

    return mpimg.imread(path).shape


# ---------------------------------------------------------------------------------------- open-set maths
def _row(clip, lang, sync_c, identity, sync_error=None, identity_error=None, cross=True, lost=0):
    return {"identity_no_face_frames": lost, "identity_frames": 10, "portrait_clip_id": clip, "portrait_identity": f"id_{clip}", "audio_clip_id": "a", "audio_language": lang,
            "cross_language": cross, "sync_c": sync_c, "sync_d": None if sync_c is None else 10 - sync_c,
            "identity": identity, "identity_gt": 0.2, "sync_backend": "syncnet" if sync_c is None else "syncnet_trained",
            "identity_backend": "dlib-descriptor-128", "sync_error": sync_error, "identity_error": identity_error,
            "identity_gt_error": None}


def test_summarise_means_per_audio_language_and_overall_with_reasons():
    table = pd.DataFrame([_row("p1", "en", 2.0, 0.3, lost=3), _row("p2", "en", 4.0, None, identity_error="identity: no face"),
                          _row("p3", "de", None, 0.5, sync_error="sync: too short", cross=False),
                          _row("p4", None, 1.0, 0.1)], columns=O.TABLE_COLUMNS)
    fids = {"en": {"fid": 3.5, "fid_backend": "dlib-descriptor-128"}, O.ALL: {"fid": None, "fid_error": "fid: few"}}
    groups = O.summarise(table, fids)
    assert set(groups) == {"en", "de", "unknown", O.ALL}
    en, de, every = groups["en"], groups["de"], groups[O.ALL]
    assert (en["n_pairs"], en["cross_language_pairs"]) == (2, 2)
    assert en["sync_c"] == pytest.approx(3.0) and en["sync_d"] == pytest.approx(7.0) and en["sync_c_n"] == 2
    assert en["identity"] == pytest.approx(0.3) and en["identity_n"] == 1  # mean over the pairs that have it
    assert en["identity_error"] == "identity: no face" and "sync_c_error" not in en
    assert en["identity_failure_rate"] == pytest.approx(3 / 20) and every["identity_failure_rate"] == pytest.approx(3 / 40)
    assert en["fid"] == 3.5 and en["sync_c_backend"] == "syncnet_trained"
    assert de["sync_c"] is None and de["sync_c_n"] == 0 and de["sync_c_error"] == "sync: too short"
    assert de["sync_c_backend"] == "syncnet" and de["cross_language_pairs"] == 0  # the label even without a value
    assert every["n_pairs"] == 4 and every["sync_c"] == pytest.approx(7.0 / 3) and every["sync_c_n"] == 3
    assert every["identity"] == pytest.approx(0.3) and every["fid"] is None and every["fid_error"] == "fid: few"
    assert every["identity_gt"] == pytest.approx(0.2) and every["identity_gt_n"] == 4


def test_summarise_of_no_pair_is_an_empty_overall():
    groups = O.summarise(pd.DataFrame(columns=O.TABLE_COLUMNS))
    assert list(groups) == [O.ALL] and groups[O.ALL]["n_pairs"] == 0 and groups[O.ALL]["sync_c"] is None


# ---------------------------------------------------------------------------------------- open-set inputs
def _feature_file(path: Path, n: int, side: int = 16, value: int = 0, rate: int = 1600, fps: float = 10.0) -> Path:
    from safetensors.torch import save_file

    frames = (np.arange(n)[:, None, None, None] + value + np.zeros((1, 3, side, side))).astype(np.uint8)
    save_file({"frames": torch.from_numpy(frames), "waveform": torch.linspace(-1, 1, int(n / fps * rate)),
               "landmarks": torch.full((n, 68, 2), float(value))}, str(path))
    return path


def _params(**eval_keys) -> Params:
    return Params.model_validate({"data": {"fps": 10.0, "audio_rate": 1600}, "eval": eval_keys})


def test_pair_inputs_come_from_the_feature_files(tmp_path):
    files = {"portrait": str(_feature_file(tmp_path / "p.safetensors", 30, value=7)),
             "speech": str(_feature_file(tmp_path / "s.safetensors", 12))}
    pair = {"clip_id": "portrait", "audio_clip_id": "speech", "audio_path": "nowhere.mp4", "crop_path": "nowhere.mp4"}
    x = O.pair_inputs(pair, files, _params(clip_seconds=2.0))
    assert x.n == 12 and len(x.audio) == 12 * 160  # the audio clip (1.2 s) is shorter than clip_seconds
    assert (x.portrait == 7).all() and x.portrait.shape == (16, 16, 3) and (x.portrait_landmarks == 7).all()
    assert len(x.portrait_frames) == 12 and (x.portrait_source, x.audio_source) == ("features", "features")
    assert O.pair_inputs(pair, files, _params(clip_seconds=0.5)).n == 5


def test_pair_inputs_of_rejected_clips_read_the_crop_and_audio(tmp_path):
    from mcdm.media.io import write_video

    crop = tmp_path / "crop.mp4"
    frames = np.full((10, 64, 64, 3), 128, np.uint8)
    write_video(crop, frames, fps=10.0, audio=np.sin(np.arange(16000) / 5).astype(np.float32) * 0.3, audio_rate=16000)
    np.savez(tmp_path / "lm.npz", landmarks=np.full((10, 68, 2), 3.0, np.float32))
    pair = {"clip_id": "p", "audio_clip_id": "s", "audio_path": str(crop), "crop_path": str(crop),
            "landmarks_path": str(tmp_path / "lm.npz")}
    x = O.pair_inputs(pair, {}, Params.model_validate({"data": {"fps": 10.0}, "eval": {"clip_seconds": 0.5}}))
    assert (x.portrait_source, x.audio_source) == ("crop", "audio_path") and x.portrait_frames is None
    assert x.n == 5 and len(x.audio) == 8000 and x.portrait.shape == (64, 64, 3) and (x.portrait_landmarks == 3).all()
    pair["crop_path"] = str(tmp_path / "missing.mp4")
    with pytest.raises(McdmError, match="pair p x s: cannot read its inputs"):
        O.pair_inputs(pair, {}, _params())


def test_training_frames_are_evenly_spaced_over_the_train_clips_only(tmp_path):
    index = pd.DataFrame({"clip_id": ["a", "b", "t"], "split": ["train", "train", "test"],
                          "file": [str(_feature_file(tmp_path / f"{c}.safetensors", 21, value=v))
                                   for c, v in (("a", 0), ("b", 100), ("t", 200))]})
    frames, clips = O.training_frames(index, 5)
    assert clips == ["a", "b"] and len(frames) == 5
    assert [int(f[0, 0, 0]) for f in frames] == [0, 10, 20, 100, 120]  # 3 + 2 frames, first to last of each clip
    with pytest.raises(McdmError, match="no train clip"):
        O.training_frames(index[index["split"] == "test"], 5)


# ---------------------------------------------------------------------------------------- token figures maths
def test_loudness_envelope_is_the_rms_in_dbfs_per_video_frame():
    rate, fps, amp = 16000, 25.0, 0.5
    t = np.arange(rate) / rate
    wave = np.concatenate([amp * np.sin(2 * np.pi * 400 * t[: rate // 2]), np.zeros(rate // 2)])
    env = T.loudness_envelope(wave, 26, fps, rate)
    assert env.shape == (26,)
    assert env[:12] == pytest.approx(20 * np.log10(amp / np.sqrt(2)), abs=0.05)  # a sine's RMS is A / sqrt(2)
    assert env[13:25] == pytest.approx(-100.0) and env[25] == pytest.approx(-100.0)  # silence, then past the end


def test_lip_tokens_are_sampled_clip_by_clip_as_the_pipeline_does():
    from mcdm.models.motion_prior import PresentClipMotionPrior

    torch.manual_seed(0)
    prior = PresentClipMotionPrior(audio_dim=6, ref_dim=5, lip_dim=3, expression_dim=2, landmark_dim=4, dim=16,
                                   num_layers=1, num_heads=2, audio_window=1).eval()
    audio, ref = np.random.default_rng(0).normal(size=(11, 6)), np.ones(5)
    tokens = T.sample_lip_tokens(prior, audio, ref, 4, 2, torch.Generator().manual_seed(3))
    assert tokens.shape == (11, 3) and np.isfinite(tokens).all()
    first = prior.sample(torch.as_tensor(audio[None, :4], dtype=torch.float32), torch.ones(1, 5), num_inference_steps=2,
                         generator=torch.Generator().manual_seed(3)).lip[0]
    assert tokens[:4] == pytest.approx(first.numpy(), abs=1e-5)  # the first clip, same noise


def test_tsne_perplexity_is_bounded_by_the_points_and_seeded():
    points = np.random.default_rng(1).normal(size=(6, 4))
    coords, perplexity = T.tsne_2d(points, 30.0, seed=0)
    assert coords.shape == (6, 2) and perplexity == 5.0
    assert T.tsne_2d(points, 30.0, seed=0)[0] == pytest.approx(coords)
    assert T.tsne_2d(points, 2.0, seed=0)[1] == 2.0
    with pytest.raises(McdmError, match="at least 2 points"):
        T.tsne_2d(points[:1], 30.0, seed=0)


def test_figure_writers_write_readable_pngs(tmp_path):
    rng = np.random.default_rng(0)
    panels = [T.LipPanel("clip_a", "ada", rng.normal(-30, 5, 20), rng.normal(size=(20, 4)), rng.normal(size=(20, 4))),
              T.LipPanel("clip_b", "bob", rng.normal(-30, 5, 12), None, rng.normal(size=(12, 4)), "no prior")]
    heat = T.plot_lip_heatmap(panels, 25.0, tmp_path / "lip.png")
    assert heat.is_file() and _png_shape(heat)[0] > 200
    table = pd.DataFrame({"clip_id": ["a", "a", "b", "c"], "split": ["test", "test", "open_set", "open_set"],
                          "identity": ["ada", "ada", "bob", "bob"], "frame": [0, 5, 0, 3], "x": rng.normal(size=4),
                          "y": rng.normal(size=4)})
    tsne = T.plot_tsne(table, 3.0, tmp_path / "tsne.png")
    assert tsne.is_file() and _png_shape(tsne)[1] > 200
    with pytest.raises(McdmError, match="no clip"):
        T.plot_lip_heatmap([], 25.0, tmp_path / "none.png")


# ---------------------------------------------------------------------------------------- report sections
def _summary(tmp_path: Path) -> dict:
    table = pd.DataFrame([_row("p1", "en", 2.0, 0.3), _row("p2", "de", 4.0, None, identity_error="identity: no face")],
                         columns=O.TABLE_COLUMNS)
    groups = O.summarise(table, {O.ALL: {"fid": 12.5, "fid_backend": "dlib-descriptor-128"}})
    overall = groups.pop(O.ALL)
    return {"overall": overall, "by_language": groups, "languages": sorted(groups), "table": str(tmp_path / "open_set.csv"),
            "backends": {"sync_c": "syncnet_trained", "fid": "dlib-descriptor-128"}, "fid_real": {"frames": 40},
            "n_pairs": 2, "pairs_available": 3, "params_hash": "hash-open", "model_params_hash": "hash-model",
            "variant": "full", "alpha": 0.1, "steps": 2, "clip_seconds": 1.0}


def test_report_sections_read_the_summaries_and_list_what_is_missing(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "open_set.json").write_text(json.dumps(_summary(reports)))
    (reports / "metrics_details.json").write_text(json.dumps({"sync_c": 2.5, "sync_d": 7.0, "identity": 0.4, "identity_gt": 0.25,
                                                       "fid": 9.0, "params_hash": "hash-test"}))
    T.plot_tsne(pd.DataFrame({"clip_id": ["a", "b"], "split": ["test", "open_set"], "identity": ["x", "y"],
                              "frame": [0, 0], "x": [0.0, 1.0], "y": [1.0, 0.0]}), 1.0, reports / "tsne.png")
    figures = {"lip_heatmap": {"path": str(reports / "lip.png"), "clips": ["c1"], "sampled": True, "lip_dim": 4},
               "tsne": {"path": str(reports / "tsne.png"), "csv": "tsne.csv", "points": 2, "clips": 2, "perplexity": 1.0}}
    (reports / "token_figures.json").write_text(json.dumps(figures))
    params = Params.model_validate({"ablations": {"variants": ["full"], "seeds": [0]}, "sweep": {"alphas": [0.1]}})
    done = report.write_report(params, reports / "metrics_details.json", reports / "ablations", [], reports / "data.json",
                               reports, open_set=reports / "open_set.json", token_figures=reports / "token_figures.json")
    text = (reports / "report.md").read_text()
    assert "not produced by this pipeline" not in text
    assert "## Open set: unseen portraits x held-out audio" in text and "[open_set.csv](open_set.csv)" in text
    assert "| en | 1 (1 cross-language) | 2 (n 1) | 8 (n 1) | 0.3 (n 1) | 0 | 0.2 | n/a |" in text
    assert "| all languages | 2 (2 cross-language) | 3 (n 2) | 7 (n 2) | 0.3 (n 1) | 0 | 0.2 | 12.5 |" in text
    assert "`hash-open`" in text and "`hash-model`" in text and "FID `dlib-descriptor-128`" in text
    assert "Not computed: identity: no face." in text
    assert "open set minus test: Sync-C +0.5, Sync-D +0, identity -0.1." in text
    assert "![t-SNE of expression tokens](tsne.png)" in text
    assert f"Missing: the lip-token heatmap picture `{reports / 'lip.png'}`." in text  # never drawn: said so
    assert f"`{reports / 'lip.png'}`: MISSING" in text and str(reports / "lip.png") in done["missing"]
    (reports / "open_set.json").unlink()
    done = report.write_report(params, reports / "metrics_details.json", reports / "ablations", [], reports / "data.json",
                               reports, open_set=reports / "open_set.json")
    text = (reports / "report.md").read_text()
    assert str(reports / "open_set.json") in done["missing"] and "(run `dvc repro open_set`)" in text
    assert "Not given to `mcdm report` (`--token-figures`)" in text


# ---------------------------------------------------------------------------------------- stage wiring
def test_the_stages_run_after_the_main_line_and_before_the_report():
    sys.path.insert(0, str(ROOT / "flows"))
    from pipeline import main_line_stages, report_input_stages

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert report_input_stages(ROOT) == ["open_set", "token_figures", "claims"]  # claims after the matrix's members
    assert not {"open_set", "token_figures", "claims"} & set(main_line_stages(ROOT))  # not in `dvc repro evaluate`
    outs = {next(iter(o)) if isinstance(o, dict) else o for name in ("open_set", "token_figures")
            for kind in ("outs", "metrics") for o in stages[name].get(kind, [])}
    assert not outs & set(stages["evaluate"]["deps"])
    assert {"reports/open_set.json", "reports/token_figures.json", "reports/claims.json"} <= set(stages["report"]["deps"])
    assert "models/stage3" in stages["open_set"]["deps"] and "eval.open_set" in stages["open_set"]["params"]
    assert "eval.token_figures" in stages["token_figures"]["params"]


# ---------------------------------------------------------------------------------------- micro pipeline
def test_micro_open_set_table_and_summary(micro_pipeline):
    root = micro_pipeline
    params = load_params(root / "params.yaml")
    pairs = pd.read_parquet(root / "data" / "split" / "open_set.parquet")
    train = pd.read_parquet(root / "data" / "split" / "train.parquet")
    table = pd.read_csv(root / "reports" / "open_set.csv")
    summary = json.loads((root / "reports" / "open_set.json").read_text())
    assert len(table) == min(params.eval.open_set.max_pairs, len(pairs)) >= 1
    assert list(table.columns) == O.TABLE_COLUMNS
    assert set(table["portrait_clip_id"]) <= set(pairs["clip_id"])
    assert not set(table["portrait_identity"]) & set(train["source_id"])  # portraits never seen in training
    limit = round(params.eval.clip_seconds * params.data.fps)
    assert ((table["n_frames"] >= 1) & (table["n_frames"] <= limit)).all()
    for metric, error in O.ROW_METRICS.items():  # a number, or null with its reason
        missing = table[metric].isna()
        assert table.loc[missing, error].notna().all(), metric
        assert np.isfinite(table.loc[~missing, metric]).all(), metric
    assert summary["n_pairs"] == len(table) and summary["overall"]["n_pairs"] == len(table)
    assert set(summary["by_language"]) == set(table["audio_language"].astype(str))
    assert summary["params_hash"] == params.hash()
    assert summary["backends"]["identity"] == "dlib-descriptor-128" and summary["backends"]["fid"]
    assert summary["fid_real"]["split"] == "train" and 2 <= summary["fid_real"]["frames"] <= params.eval.open_set.fid_real_frames
    assert set(summary["fid_real"]["clips"]) <= set(train["clip_id"])
    sync = table["sync_c"].dropna()
    overall = summary["overall"]
    if len(sync):
        assert overall["sync_c"] == pytest.approx(sync.mean()) and overall["sync_c_backend"]
    else:
        assert overall["sync_c"] is None and overall["sync_c_error"]
    for metric in ("identity", "fid"):
        assert overall[metric] is not None or overall[f"{metric}_error"], metric


def test_micro_open_set_is_logged_to_mlflow_and_on_the_registered_version(micro_pipeline):
    from mlflow import MlflowClient

    from mcdm.tracking import runs as tracking

    params = load_params(micro_pipeline / "params.yaml")
    summary = json.loads((micro_pipeline / "reports" / "open_set.json").read_text())
    uri = tracking.default_tracking_uri(micro_pipeline)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment).experiment_id
    runs = client.search_runs([experiment], filter_string="tags.stage = 'open_set'")
    assert runs and runs[0].data.metrics["n_pairs"] == summary["n_pairs"]
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "open_set")}
    assert artifacts == {"open_set/open_set.csv", "open_set/open_set.json"}
    from mcdm.eval.record import _model_version, _stage3_info

    version, run_id = _model_version(client, params, _stage3_info(micro_pipeline / "models"))  # evaluate's lookup
    assert version is not None
    logged = client.get_run(run_id).data.metrics
    assert any(k.startswith("eval.") for k in logged)
    assert logged["open_set.n_pairs"] == summary["n_pairs"]
    for metric in ("identity", "fid"):  # on the version beside its eval.* metrics, when measured
        if summary["overall"].get(metric) is not None:
            assert logged[f"open_set.overall.{metric}"] == pytest.approx(summary["overall"][metric])


def test_micro_token_figures(micro_pipeline):
    root = micro_pipeline
    params = load_params(root / "params.yaml")
    reports = root / "reports"
    summary = json.loads((reports / "token_figures.json").read_text())
    for name in ("lip_tokens.png", "expression_tsne.png"):
        assert len(_png_shape(reports / name)) == 3, name
    index = pd.read_parquet(root / "data" / "features" / "index.parquet")
    shown = index[index["split"].isin(["test", "open_set"])]
    coords = pd.read_csv(reports / "expression_tsne.csv")
    assert set(coords["clip_id"]) == set(shown["clip_id"])
    assert len(coords) == sum(min(n, params.eval.token_figures.tsne_frames_per_clip) for n in shown["n_frames"])
    assert np.isfinite(coords[["x", "y"]].to_numpy()).all() and coords["identity"].notna().all()
    tsne, lip = summary["tsne"], summary["lip_heatmap"]
    assert tsne["points"] == len(coords) and tsne["perplexity"] == min(params.eval.token_figures.tsne_perplexity, len(coords) - 1)
    assert len(lip["clips"]) == min(params.eval.token_figures.heatmap_clips, int((index["split"] == "test").sum()))
    assert lip["sampled"] and max(lip["frames"]) <= math.ceil(params.eval.token_figures.heatmap_seconds * params.data.fps)


def test_micro_report_has_the_open_set_and_the_token_figures(micro_pipeline):
    reports = micro_pipeline / "reports"
    text = (reports / "report.md").read_text()
    summary = json.loads((reports / "open_set.json").read_text())
    assert "not produced by this pipeline" not in text and "MISSING" not in text
    assert "## Open set: unseen portraits x held-out audio" in text and f"`{summary['params_hash']}`" in text
    assert "| all languages |" in text and "Beside the test split" in text
    assert "![lip-token heatmap](lip_tokens.png)" in text
    assert "![t-SNE of expression tokens](expression_tsne.png)" in text
