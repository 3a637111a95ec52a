"""The evaluate stage on tiny synthetic features and untrained tiny models, through `mcdm evaluate`:
every output is written, the baselines hold their closed forms (ground truth vs itself: SSIM 1, FID 0,
identity gap 0; static reference: identity 0), metrics.json is the small headline and
metrics_details.json the rest (strict JSON), the long-term curve has one row per
`eval.long_term_every` frames and its windows agree with it, the Fréchet feature rows are kept per
clip, and the models/ folder of the stages loads as a pipeline."""
from __future__ import annotations

import json
import math
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from conftest import TINY_PIPELINE, tiny
from safetensors.torch import save_file

from mcdm import cli
from mcdm.config import dump_params
from mcdm.eval.face_features import DlibFrameFeatures
from mcdm.eval.long_term import long_term_curve, window_bounds
from mcdm.eval.metric_files import HEADLINE, read_features
from mcdm.media.io import probe
from mcdm.models.sync.syncnet import SyncNet
from mcdm.pipelines.loading import load_pipeline
from mcdm.train.builders import build_untrained_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIDE, FPS, RATE = 64, 25.0, 16000
EVAL = {"steps": 2, "threads": 1, "clip_seconds": None, "batch_size": 2, "fvd_clip_frames": 4, "long_term_seconds": 0.6,
        "long_term_every": 5, "long_term_window_seconds": 0.2, "n_samples": 1, "grid_clips": 2, "grid_times": 2}
CLIPS = {"a_test": ("test", 8, False), "b_test": ("test", 9, False), "c_long": ("test", 20, True),
         "d_train": ("train", 4, False)}


def _head_video(n: int, phase: float) -> np.ndarray:
    """A talking-head-like crop: the astronaut's face rocking and drifting (a face dlib finds)."""
    face = skimage.data.astronaut()[20:260, 100:340]
    frames = []
    for t in range(n):
        warp = cv2.getRotationMatrix2D((120.0, 120.0), 5 * np.sin(2 * np.pi * t / 24 + phase), 1.0)
        warp[:, 2] += [6 * np.sin(2 * np.pi * t / 29 + phase), 4 * np.cos(2 * np.pi * t / 37 + phase)]
        moved = cv2.warpAffine(face, warp, (240, 240), borderMode=cv2.BORDER_REFLECT)
        frames.append(cv2.resize(moved, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
    return np.stack(frames)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """features/ (index + per-clip files), models/ laid out as the stages write it, a SyncNet, params.yaml."""
    root = tmp_path_factory.mktemp("evaluate")
    params = tiny(TINY_PIPELINE, eval=EVAL)
    (root / "params.yaml").write_text(dump_params(params))
    # 1. features of the features stage (the arrays evaluate reads)
    feats = root / "features"
    feats.mkdir()
    faces = DlibFrameFeatures()
    rows = []
    for i, (clip_id, (split, n, long_term)) in enumerate(CLIPS.items()):
        frames = _head_video(n, phase=1.3 * i)
        landmarks = faces.landmarks(frames)
        assert np.isfinite(landmarks[0]).all()
        landmarks = np.where(np.isfinite(landmarks), landmarks, landmarks[0]).astype(np.float32)
        t = np.arange(int(round(n / FPS * RATE))) / RATE
        wave = (0.2 * np.sin(2 * np.pi * (180 + 20 * i) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
        save_file({"frames": torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))),
                   "waveform": torch.from_numpy(wave), "landmarks": torch.from_numpy(landmarks)},
                  str(feats / f"{clip_id}.safetensors"))
        rows.append({"clip_id": clip_id, "split": split, "n_frames": n, "long_term": long_term,
                     "path": str(feats / f"{clip_id}.safetensors")})
    pd.DataFrame(rows).to_parquet(feats / "index.parquet")
    # 2. models/: the stages' layout, untrained components
    pipe = build_untrained_pipeline(params)
    models = root / "models"
    pipe.vae.save_pretrained(models / "base" / "vae")
    pipe.scheduler.save_pretrained(models / "base" / "scheduler")
    (models / "base" / "encoders.json").write_text(json.dumps(
        {"audio": {"backend": "logmel", "dim": 80}, "image": {"backend": "dlib+vae", "dim": 144}}))
    pipe.landmark_guider.save_pretrained(models / "stage1" / "landmark_guider")
    pipe.motion_prior.save_pretrained(models / "stage2" / "motion_prior")
    pipe.denoiser.save_pretrained(models / "stage3" / "denoiser")
    (models / "stage3" / "stage.json").write_text(json.dumps({"stage": 3, "variant": "full", "params_hash": params.hash()}))
    pipe.head_encoder.save_pretrained(models / "motion_encoders" / "head")
    SyncNet(channels=(8, 16, 16, 16), embed_dim=16).eval().save_pretrained(models / "syncnet")
    return root, params


@pytest.fixture(scope="module")
def evaluated(project):
    root, _ = project
    code = cli.main(["--params", str(root / "params.yaml"), "evaluate", "--features", str(root / "features"),
                     "--models", str(root / "models"), "--syncnet", str(root / "models" / "syncnet"),
                     "--out", str(root / "reports"), "--samples", str(root / "reports" / "samples"), "--no-tracking"])
    assert code == 0
    return root / "reports"


def _strict_json(path):
    def refuse(token):
        raise ValueError(f"{path}: non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_models_folder_and_registry_bundle_load_as_the_pipeline(project, tmp_path):
    root, params = project
    models = root / "models"
    pipe = load_pipeline(models, params)
    assert pipe.variant == "full" and pipe.landmark_guider is not None and pipe.head_encoder is not None
    assert pipe.config.provenance["params_hash"] == params.hash()
    # the folder stage 3 registers (mcdm.train.stages.registry_bundle): every component side by side
    bundle = tmp_path / "bundle"
    for src, dst in (("stage3/denoiser", "denoiser"), ("stage1/landmark_guider", "landmark_guider"),
                     ("base/vae", "vae"), ("base/scheduler", "scheduler"), ("stage2/motion_prior", "motion_prior"),
                     ("motion_encoders", "motion_encoders")):
        shutil.copytree(models / src, bundle / dst)
    shutil.copy(models / "base" / "encoders.json", bundle / "encoders.json")
    shutil.copy(models / "stage3" / "stage.json", bundle / "stage3.json")
    (bundle / "params.yaml").write_text(dump_params(params))
    again = load_pipeline(bundle)  # no params given: the bundle's own
    assert again.variant == "full" and again.head_encoder is not None and again.config.clip_frames == 4
    for name, tensor in pipe.denoiser.state_dict().items():
        torch.testing.assert_close(again.denoiser.state_dict()[name], tensor)


def test_evaluate_writes_every_output(evaluated, capsys):
    for name in ("metrics.json", "metrics_details.json", "features.npz", "eval_clips.csv", "eval_grid.png",
                 "frame_strip.png", "long_term.csv", "long_term_windows.csv", "long_term.png"):
        assert (evaluated / name).is_file(), name
    samples = sorted(p.name for p in (evaluated / "samples").glob("*.mp4"))
    assert samples == ["a_test.mp4", "long_term_c_long.mp4"]
    info = probe(evaluated / "samples" / "a_test.mp4")
    assert info.has_audio and info.n_frames == 8
    assert probe(evaluated / "samples" / "long_term_c_long.mp4").n_frames == 15
    clips = pd.read_csv(evaluated / "eval_clips.csv")
    assert list(clips["clip_id"]) == ["a_test", "b_test", "c_long"]  # regular test clips first; no train clip
    assert list(clips["n_frames"]) == [8, 9, 20]
    assert {"ssim", "identity", "identity_gt", "sync_c", "sync_d", "no_face_frames", "face_frames",
            "static_reference_sync_c", "reversed_ground_truth_sync_c"} <= set(clips.columns)
    assert ((clips["identity"] >= 0) & (clips["identity"] <= 1.0)).all()  # a lost face counts 1.0, never NaN


def test_metrics_json_is_the_headline_and_the_details_hold_the_rest(evaluated):
    top, m = _strict_json(evaluated / "metrics.json"), _strict_json(evaluated / "metrics_details.json")
    assert list(top) == [*HEADLINE, "fallback"]
    assert all(top[k] == m[k] for k in HEADLINE)
    assert top["fallback"] == "fid fvd sync_c sync_d efid"  # no network given by path here
    assert 0.0 <= top["failure_rate"] <= 1.0 and top["failure_rate"] == m["identity_failure_rate"]
    assert len(json.dumps(top)) < 400  # what `dvc metrics show` / `dvc exp show` list
    features = read_features(evaluated / "features.npz")
    assert set(features) == {"model", "static_reference", "ground_truth", "autoencoder", "reversed_ground_truth"}
    fid = features["model"]["fid"]
    assert len(fid["fake"]) == len(fid["fake_video"]) == m["fid_n"] and set(fid["fake_video"]) == {0, 1, 2}


def test_metrics_json_baselines_and_checks(evaluated):
    m = _strict_json(evaluated / "metrics_details.json")
    gt, static = m["baselines"]["ground_truth"], m["baselines"]["static_reference"]
    # ground truth vs itself: SSIM 1, Fréchet distances 0, identity equal to its own
    assert gt["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert gt["fid"] == pytest.approx(0.0, abs=1e-6) and gt["efid"] == pytest.approx(0.0, abs=1e-6)
    assert gt["identity_gap"] == 0.0
    # the reference frame repeated: identity 0 by construction, no drift
    assert static["identity"] == 0.0 and static["identity_drift"] == 0.0
    assert static["ssim"] < 1.0
    # the model's row: every metric present (a value or null with its reason), backends labelled
    for name in ("fid", "fvd", "ssim", "efid", "identity", "sync_c", "sync_d"):
        assert name in m and (m[name] is not None or f"{name}_error" in m), name
    assert m["ssim_backend"].startswith("ssim-wang2004") and m["sync_c_backend"] == "syncnet_trained"
    assert 0.0 < m["ssim"] < 1.0  # untrained models: not the ground truth
    assert set(m["checks"]) == {"sync_c_beats_static_reference", "fvd_beats_static_reference",
                                "identity_within_0.05_of_ground_truth", "identity_within_0.05_of_autoencoder"}
    # the autoencoder ceiling: ground truth through the VAE, measured like the model
    auto = m["baselines"]["autoencoder"]
    assert 0.0 < auto["ssim"] < 1.0 and auto["ssim_backend"] == m["ssim_backend"]
    assert (auto["fid"] or 0.0) > 0.0 or "fid_error" in auto  # an untrained VAE may decode no face
    assert auto["identity_gt"] == gt["identity_gt"]
    assert all(v in (True, False, None) for v in m["checks"].values())
    assert m["n_clips"] == 3 and m["frames"] == 37 and m["variant"] == "full"
    # no metric is null because the model lost faces: failures are charged and counted
    for name in ("fid", "efid", "fvd"):
        assert m[name] is not None and m[f"{name}_failure_rate"] is not None, name
    # ground truth played backwards: real faces (identity as ground truth's), the wrong direction of time,
    # which the FVD fallback sees
    backwards = m["baselines"]["reversed_ground_truth"]
    assert backwards["identity_no_face_frames"] == gt["identity_no_face_frames"] and backwards["fvd"] > gt["fvd"] + 1e-6


def test_quality_measures_and_targets(evaluated):
    """Issue #20: ground truth against itself has the closed forms (mouth-opening r 1, sharpness ratio 1),
    the frame strip is the first clip at full size (2 rows, every 3rd frame), the targets are all present."""
    m = _strict_json(evaluated / "metrics_details.json")
    gt = m["baselines"]["ground_truth"]
    assert gt["sharpness_ratio"] == pytest.approx(1.0) and gt["mouth_open_corr"] == pytest.approx(1.0)
    assert m["sharpness_ratio"] > 0 and m["psnr"] > 0 and m["sharpness_ratio_backend"].startswith("variance-of-laplacian")
    assert "mouth_open_corr" in m and m["mouth_open_corr_backend"].startswith("dlib-68")
    assert set(m["quality_targets"]) == {"resolution", "autoencoder_identity_gap", "identity_gap", "no_face_frames",
                                         "sync_c_fraction", "mouth_open_corr", "sharpness_ratio"}
    assert m["quality_targets"]["resolution"] == {"value": SIDE, "target": ">= 128", "met": False}
    assert m["quality_targets"]["no_face_frames"]["value"] == m["identity_no_face_frames"]
    strip = cv2.imread(str(evaluated / "frame_strip.png"))
    assert strip.shape[:2] == (2 * SIDE + 2, 3 * SIDE + 2 * 2)  # a_test: 8 frames -> 0, 3, 6
    clips = pd.read_csv(evaluated / "eval_clips.csv")
    assert {"psnr", "sharpness_ratio", "mouth_open_corr", "ground_truth_psnr"} <= set(clips.columns)


def test_long_term_curve(evaluated):
    curve = pd.read_csv(evaluated / "long_term.csv")
    assert list(curve.columns) == ["frame", "ssim", "identity", "no_face", "identity_gt"]
    assert list(curve["frame"]) == [0, 5, 10]  # 0.6 s of the 20-frame long clip, a row per 5 frames
    assert ((curve["ssim"] > -1) & (curve["ssim"] < 1)).all()
    gt = curve["identity_gt"].to_numpy()
    assert np.isfinite(gt).all() and gt[0] == pytest.approx(0.0, abs=1e-9)  # frame 0 is the reference
    assert (gt < 0.6).all()  # the same person throughout (dlib's threshold)
    summary = _strict_json(evaluated / "metrics_details.json")["long_term"]
    assert summary["clips"] == ["c_long"] and summary["source"] == "long_term" and summary["frames"] == 15
    assert math.isfinite(summary["ssim_mean"])
    # windows of 0.2 s = 5 frames, a curve row every 5 frames: each window is one row of the curve
    windows = pd.read_csv(evaluated / "long_term_windows.csv")
    assert list(windows["window"]) == [0, 1, 2] and list(windows["frames"]) == [5, 5, 5]
    assert list(windows["start_s"]) == pytest.approx([0.0, 0.2, 0.4])
    np.testing.assert_allclose(windows["ssim"], curve["ssim"], rtol=1e-12)
    np.testing.assert_allclose(windows["identity"], curve["identity"], rtol=1e-12)
    assert (windows["identity_frames"] == 1).all()
    assert windows["sync_c"].isna().all()  # 5 frames are too few for SyncNet's offset search: no value, no error
    assert summary["window_ssim_decay"] == pytest.approx(windows["ssim"].iloc[0] - windows["ssim"].iloc[-1])


def test_long_term_curve_driven_by_ground_truth_landmarks(project, tmp_path):
    """eval.use_landmarks: the long-term clips are generated driven by their own landmarks (it crashed on
    the landmarks' shape: each clip's (1, T, 68, 2) stacked to (B, 1, T, 68, 2))."""
    root, params = project
    driven = tiny(TINY_PIPELINE, eval={**EVAL, "use_landmarks": True})
    pipe = load_pipeline(root / "models", driven)
    summary = long_term_curve(pipe, root / "features", tmp_path / "long_term.csv", driven, progress=False,
                              ground_truth=False)
    curve = pd.read_csv(tmp_path / "long_term.csv")
    assert summary["clips"] == ["c_long"] and summary["frames"] == 15 and list(curve["frame"]) == [0, 5, 10]
    assert ((curve["ssim"] > -1) & (curve["ssim"] < 1)).all()


@pytest.mark.parametrize("n, size, bounds", [(15, 5, [(0, 5), (5, 10), (10, 15)]), (17, 5, [(0, 5), (5, 10), (10, 15)]),
                                             (3, 5, [(0, 3)]), (5, 5, [(0, 5)])])
def test_long_term_windows_are_whole_windows(n, size, bounds):
    assert window_bounds(n, size) == bounds
