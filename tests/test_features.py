"""base_models end to end on crop clips, and the features stage (what training reads instead of video)."""
from __future__ import annotations

import json
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mcdm.config import Params
from mcdm.errors import McdmError
from mcdm.media import layout
from mcdm.models.frozen import load_frozen_encoders
from mcdm.models.vae import load_vae
from mcdm.pipelines.loading import load_base_models, load_ref_tokens
from mcdm.train.base_models.pretrain import build_base_models

RES, T, FPS = 64, 30, 25.0


# ------------------------------------------------------------------------------------ fixtures
def _photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook
    from PIL import Image
    from skimage import data

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        hopper = np.asarray(Image.open(fh).convert("RGB"))
    return {"astronaut": data.astronaut(), "hopper": hopper}


def make_crop_clips(root: Path, n_clips: int, n_frames: int = T, seed: int = 0) -> pd.DataFrame:
    """Faces-stage-like outputs: square 64 px crop mp4s (face moving a little, audio muxed) and
    landmark npz files (dlib landmarks of the photo, moved with the crop)."""
    import cv2

    from mcdm.face.dlib import DlibFace
    from mcdm.media.io import write_video

    rng = np.random.default_rng(seed)
    face = DlibFace()
    photos = _photos()
    rows = []
    for c in range(n_clips):
        name = sorted(photos)[c % 2]
        img = photos[name]
        box = face.detect(img)[0].box
        lm = face.landmarks(img, box)
        cx, cy, side = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 1.7 * (box[2] - box[0])
        phase = rng.uniform(0, 6.3)
        frames, lms = [], []
        for k in range(n_frames):
            centre = (cx + 0.04 * side * np.sin(0.2 * k + phase), cy + 0.03 * side * np.cos(0.15 * k + phase))
            m = cv2.getRotationMatrix2D(centre, 4 * np.sin(0.1 * k + phase), RES / side)
            m[:, 2] += RES / 2 - np.array(centre)
            frames.append(cv2.warpAffine(img, m, (RES, RES), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT))
            lms.append((np.c_[lm, np.ones(68)] @ m.T).astype(np.float32))
        t = np.arange(int(n_frames / FPS * 16000)) / 16000
        audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t + phase))).astype(np.float32)
        clip_id = f"{name}_{c:02d}"
        crop = write_video(root / "crops" / f"{clip_id}.mp4", np.stack(frames), FPS, audio, 16000)
        lm_path = root / "landmarks" / f"{clip_id}.npz"
        lm_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(lm_path, landmarks=np.stack(lms), boxes=np.zeros((n_frames, 4), np.float32),
                 detected=np.ones(n_frames, bool))
        rows.append(dict(clip_id=clip_id, video_id=f"v{c:02d}", source_id=name, file=f"{clip_id}.mp4",
                         n_frames=n_frames, crop_path=str(crop), landmarks_path=str(lm_path)))
    return pd.DataFrame(rows)


def tiny_params(**base_models) -> Params:
    p = Params()
    p.data = p.data.model_copy(update={"workers": 1})
    p.base_models = p.base_models.model_copy(update={
        "vae_block_out_channels": [8, 8, 8, 8], "vae_norm_num_groups": 8, "vae_steps": 10, "vae_eval_every": 5,
        "vae_psnr_threshold": 5.0, "unet_steps": 4, "batch_size": 4, "unet_batch_size": 4, "threads": 1, **base_models,
    })
    return p


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, object]:
    """Split tables over 6 clips: 3 train, test = 1 good + 1 corrupt crop + 1 short landmark track,
    open_set = 1 portrait clip paired with the test clip's audio."""
    root = tmp_path_factory.mktemp("clips")
    df = make_crop_clips(root, 6)
    bad = root / "crops" / "corrupt.mp4"
    bad.write_bytes(b"not a video at all")
    corrupt = {**df.iloc[4].to_dict(), "clip_id": "corrupt", "file": "corrupt.mp4", "crop_path": str(bad)}
    short_lm = root / "landmarks" / "short.npz"
    with np.load(df.iloc[4]["landmarks_path"]) as npz:
        np.savez(short_lm, landmarks=npz["landmarks"][:10], detected=npz["detected"][:10])
    short = {**df.iloc[4].to_dict(), "clip_id": "short", "file": "short.mp4", "landmarks_path": str(short_lm)}
    split = root / "split"
    split.mkdir()
    df.iloc[:3].to_parquet(split / "train.parquet")
    pd.DataFrame([df.iloc[3].to_dict() | {"long_term": True}, corrupt, short]).to_parquet(split / "test.parquet")
    df.iloc[5:6].assign(audio_clip_id=df.iloc[3]["clip_id"]).to_parquet(split / "open_set.parquet")
    return {"root": root, "split": split, "table": df}


@pytest.fixture(scope="module")
def base_dir(clips) -> Path:
    out = clips["root"] / "models" / "base"
    build_base_models(clips["split"] / "train.parquet", out, tiny_params(), progress=False)
    return out


@pytest.fixture(scope="module")
def features_dir(clips, base_dir) -> Path:
    from mcdm.data.features import features

    out = clips["root"] / "features"
    torch.set_num_threads(1)
    features(clips["split"], base_dir, out, tiny_params())
    return out


# ---------------------------------------------------------------------------------- base_models
def test_base_models_layout_and_encoders_json(base_dir):
    for sub in ("vae", "unet", "ref_tokens", "scheduler"):
        assert (base_dir / sub).is_dir(), sub
        assert list((base_dir / sub).glob("*.json")), sub
    assert list((base_dir / "vae").glob("*.safetensors")) and list((base_dir / "unet").glob("*.safetensors"))
    assert not (base_dir.parent / "base.tmp").exists()
    enc = json.loads((base_dir / "encoders.json").read_text())
    assert enc["audio"] == {**enc["audio"], "backend": "logmel", "dim": 80, "source": None}
    assert enc["image"]["backend"] == "dlib+vae" and enc["image"]["dim"] == 128 + 16
    assert enc["vae"]["source"] == "trained" and enc["unet"]["source"] == "trained"
    metrics = json.loads((base_dir / "vae_metrics.json").read_text())
    assert metrics["passed"] and metrics["psnr_heldout"] >= 5.0 and metrics["latent_size"] == 8
    assert len(metrics["heldout_clips"]) == 1  # whole clips are held out
    from PIL import Image

    assert Image.open(base_dir / "vae_recon.png").size[1] == 2 * 64 * 3  # originals over reconstructions
    base = load_base_models(base_dir)
    assert base.latent_shape == (4, 8, 8)
    assert base.unet.config.cross_attention_dim == Params().model.prior_dim
    assert base.vae.config.scaling_factor == pytest.approx(enc["vae"]["scaling_factor"])


def test_psnr_gate_failure_stops_the_stage_in_one_line(clips, tmp_path):
    out = tmp_path / "base"
    with pytest.raises(McdmError) as err:
        build_base_models(clips["split"] / "train.parquet", out, tiny_params(vae_steps=1, vae_psnr_threshold=40.0),
                          progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "PSNR" in msg and "40 dB" in msg
    assert not out.exists()  # nothing half-made under the output name
    failed = json.loads((tmp_path / "base.failed" / "vae_metrics.json").read_text())
    assert failed["passed"] is False and failed["steps"] == 1


# ------------------------------------------------------------------------------------- features
def test_feature_files_hold_aligned_arrays(clips, base_dir, features_dir):
    from safetensors.torch import load_file

    from mcdm.media.io import read_audio, read_frames
    from mcdm.models.vae import to_model_range

    index = pd.read_parquet(features_dir / "index.parquet")
    assert set(index["clip_id"]) == set(clips["table"].iloc[[0, 1, 2, 3, 5]]["clip_id"])
    assert dict(zip(index["clip_id"], index["split"]))[clips["table"].iloc[3]["clip_id"]] == "test"
    assert index["long_term"].sum() == 1 and index["long_term"].dtype == bool
    row = index[index["split"] == "train"].iloc[0]
    f = load_file(row["path"])
    t = int(row["n_frames"])
    assert t == T
    shapes = {k: tuple(v.shape) for k, v in f.items()}
    assert shapes == {
        "frames": (t, 3, 64, 64), "latents": (t, 4, 8, 8), "audio": (t, 80), "waveform": (int(t / FPS * 16000),),
        "ref_embedding": (144,), "landmarks": (t, 68, 2), "detected": (t,), "head_pose": (t, 6),
        "expression": (t, 136), "mouth_crops": (t, 32, 48),
    }
    assert f["frames"].dtype == torch.uint8 and f["mouth_crops"].dtype == torch.uint8
    # the stored frames and audio are the crop's, decoded once
    frames = read_frames(row["crop_path"], fps=FPS)
    np.testing.assert_array_equal(f["frames"].permute(0, 2, 3, 1).numpy(), frames[:t])
    np.testing.assert_allclose(f["waveform"].numpy(), read_audio(row["crop_path"])[: len(f["waveform"])], atol=1e-6)
    # latents = VAE posterior mean x scaling_factor, recomputed here directly with diffusers
    vae = load_vae(layout.base_path(base_dir, layout.VAE))
    with torch.no_grad():
        z = vae.encode(to_model_range(frames[:4])).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(f["latents"][:4], z, atol=1e-5, rtol=1e-4)
    # landmarks as given by the faces stage; the reference embedding is frame 0's
    with np.load(row["landmarks_path"]) as npz:
        np.testing.assert_allclose(f["landmarks"].numpy(), npz["landmarks"][:t])
    ident = load_frozen_encoders(**layout.frozen_encoder_paths(base_dir)).identity
    np.testing.assert_allclose(f["ref_embedding"].numpy(), ident(frames[0], npz_lm0(row)), atol=1e-5)
    # audio features: a louder half-second shows up as more mel energy in those frames only
    assert np.isfinite(f["audio"].numpy()).all()


def npz_lm0(row) -> np.ndarray:
    with np.load(row["landmarks_path"]) as npz:
        return npz["landmarks"][0]


def test_audio_features_follow_the_audio_in_time(features_dir):
    """The test tone's 3 Hz loudness envelope must show up frame by frame in the log-mel energy."""
    from safetensors.torch import load_file

    index = pd.read_parquet(features_dir / "index.parquet")
    f = load_file(index.iloc[0]["path"])
    wave = f["waveform"].numpy()
    per_frame_rms = np.sqrt([np.mean(c**2) for c in np.array_split(wave, len(f["audio"]))])
    energy = np.log(np.exp(f["audio"].numpy()).sum(1))
    assert np.corrcoef(np.log(per_frame_rms + 1e-6), energy)[0, 1] > 0.9


def test_rejects_meta_and_stale_files(clips, features_dir):
    rej = pd.read_csv(features_dir / "rejects.csv")
    assert list(rej.columns) == ["file", "stage", "reason"]
    reasons = dict(zip(rej["file"], rej["reason"]))
    assert reasons["corrupt.mp4"].startswith("unusable_clip") and "[clip corrupt]" in reasons["corrupt.mp4"]
    assert reasons["short.mp4"].startswith("length_mismatch: 30 video frames vs 10 landmark frames")
    meta = json.loads((features_dir / "meta.json").read_text())
    assert meta["audio"] == {"backend": "logmel", "dim": 80}
    assert meta["image"]["backend"] == "dlib+vae" and meta["image"]["dim"] == 144
    assert meta["latents"]["shape"] == [4, 8, 8] and meta["fps"] == FPS
    assert meta["clips"] == {"train": 3, "test": 1, "open_set": 1}
    assert sorted(p.stem for p in features_dir.glob("*.safetensors")) == sorted(
        pd.read_parquet(features_dir / "index.parquet")["clip_id"])
    open_row = pd.read_parquet(features_dir / "index.parquet").query("split == 'open_set'").iloc[0]
    assert open_row["audio_clip_id"] == clips["table"].iloc[3]["clip_id"]


def test_job_pickles_for_dask_workers(features_dir, base_dir):
    from mcdm.data.features import FeatureJob, _guarded_clip

    job = FeatureJob(str(base_dir), str(features_dir), FPS, 16000, RES, 1)
    fn = pickle.loads(pickle.dumps(partial(_guarded_clip, job=job)))
    assert fn.keywords["job"] == job


def test_missing_inputs_name_the_stage(tmp_path, base_dir):
    from mcdm.data.features import features

    with pytest.raises(McdmError, match="dvc repro split"):
        features(tmp_path / "nosplit", base_dir, tmp_path / "out", tiny_params())


# ---------------------------------------------------------------- paper-scale weights given by path
def test_given_weights_are_loaded_resaved_and_used(clips, tmp_path):
    """Local folders for VAE, UNet, Wav2Vec 2.0 and CLIP (tiny random stand-ins of the real formats,
    checking only the loading path) are loaded, re-saved under models/base and used by features."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Wav2Vec2Config, Wav2Vec2Model

    from mcdm.data.features import features
    from mcdm.train.builders import tiny_unet_config, tiny_vae_config

    params = tiny_params()
    torch.manual_seed(0)
    given = tmp_path / "pretrained"
    AutoencoderKL(**tiny_vae_config(params.base_models, 64)).save_pretrained(given / "sd" / "vae")
    UNet2DConditionModel(**tiny_unet_config(params.model, 8)).save_pretrained(given / "sd" / "unet")
    w2v = Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                       conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                       num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2))
    w2v.save_pretrained(given / "wav2vec2")
    (given / "wav2vec2" / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=24)).save_pretrained(given / "clip")
    params.base_models = params.base_models.model_copy(update={
        "vae_path": str(given / "sd" / "vae"), "unet_path": str(given / "sd" / "unet"),
        "wav2vec2_path": str(given / "wav2vec2"), "clip_path": str(given / "clip")})
    base = tmp_path / "base"
    enc = build_base_models(clips["split"] / "train.parquet", base, params, progress=False)
    assert enc["audio"]["backend"] == "wav2vec2" and enc["audio"]["dim"] == 32
    assert enc["image"]["backend"] == "clip" and enc["image"]["dim"] == 24
    assert enc["vae"]["source"].endswith("vae") and enc["unet"]["source"].endswith("unet")
    assert not (base / "ref_tokens").exists()  # nothing pretrained here
    assert list((base / "audio_encoder").glob("*.safetensors")) and (base / "audio_encoder" / "preprocessor_config.json").exists()
    assert list((base / "image_encoder").glob("*.safetensors"))
    assert load_ref_tokens(base) is None

    split = tmp_path / "split"
    split.mkdir()
    pd.read_parquet(clips["split"] / "train.parquet").iloc[:1].to_parquet(split / "train.parquet")
    for name in ("test", "open_set"):
        pd.read_parquet(clips["split"] / "train.parquet").iloc[:0].to_parquet(split / f"{name}.parquet")
    index, _ = features(split, base, tmp_path / "features", params)
    from safetensors.torch import load_file

    f = load_file(index.iloc[0]["path"])
    assert f["audio"].shape == (T, 32) and f["ref_embedding"].shape == (24,)
    meta = json.loads((tmp_path / "features" / "meta.json").read_text())
    assert meta["audio"]["backend"] == "wav2vec2" and meta["image"]["backend"] == "clip"
