"""Encoders of the motion prior: audio / identity backends, face geometry, motion encoders and their
training stage. Maths pinned against independent references (transformers' numpy audio utilities,
scipy rotations, closed-form similarity transforms)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import save_file
from scipy.spatial.transform import Rotation

from mcdm.config import Params
from mcdm.errors import McdmError
from mcdm.face.geometry import CANONICAL_68, FACE_3D_68, RIGID_POINTS, expression_offsets, head_pose_from_landmarks
from mcdm.face.heatmaps import render_landmark_heatmaps
from mcdm.face.mouth import MOUTH_CROP_HW, mouth_boxes, mouth_crop
from mcdm.models.audio_features import logmel_per_frame, mel_filterbank
from mcdm.models.frozen import load_audio_encoder, load_identity_encoder
from mcdm.models.landmark_guider import LandmarkGuider
from mcdm.models.loading import load_strict
from mcdm.models.motion_encoders import ExpressionEncoder, HeadPoseEncoder, LipAudioEncoder, LipEncoder, MotionEncoders
from mcdm.models.vae import load_vae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ audio
def test_mel_filterbank_matches_transformers_reference():
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(257, 80, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(mel_filterbank(257, 80, 16000).numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("fps,seconds,n_frames", [(25.0, 1.0, None), (30.0, 1.3, None), (25.0, 2.0, 47), (25.0, 0.5, 20)])
def test_logmel_per_frame_length_and_numpy_reference(fps, seconds, n_frames):
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    feats = logmel_per_frame(audio, fps, n_frames)
    expected_t = n_frames if n_frames is not None else int(round(seconds * fps))
    assert feats.shape == (expected_t, 80) and feats.dtype == np.float32

    # independent reference: numpy STFT + mel of transformers.audio_utils, then per-video-frame means
    mel = spectrogram(audio, window_function(400, "hann"), frame_length=400, hop_length=160, fft_length=512, power=2.0,
                      center=True, pad_mode="reflect", mel_filters=mel_filter_bank(257, 80, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney"),
                      mel_floor=1e-6, log_mel="log").T  # (J, 80)
    centre_x_fps = np.arange(len(mel)) * 160 * fps  # centre time * rate * fps: exact integers here
    ref = np.empty((expected_t, 80), np.float32)
    for f in range(expected_t):
        inside = (centre_x_fps >= f * 16000) & (centre_x_fps < (f + 1) * 16000)  # centre in [f/fps, (f+1)/fps)
        ref[f] = mel[inside].mean(0) if inside.any() else mel[min(int(round((f + 0.5) / fps * 100)), len(mel) - 1)]
    np.testing.assert_allclose(feats, ref, atol=2e-3)
    assert np.all(np.isfinite(feats))


def test_logmel_backend_and_errors():
    backend = load_audio_encoder("logmel")
    assert backend.name == "logmel" and backend.dim == 80
    assert backend(np.zeros(16000, np.float32), 25.0, 25).shape == (25, 80)
    with pytest.raises(McdmError, match="empty"):
        logmel_per_frame(np.zeros(0, np.float32), 25.0)


def test_wav2vec2_backend_loads_local_folder_and_aligns_to_frames(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    Wav2Vec2Model(cfg).save_pretrained(tmp_path / "w2v")  # plumbing only: never used as a frozen encoder
    backend = load_audio_encoder("wav2vec2", str(tmp_path / "w2v"))
    assert backend.name == "wav2vec2" and backend.dim == 16
    feats = backend(np.random.default_rng(0).standard_normal(24000).astype(np.float32) * 0.1, 25.0)
    assert feats.shape == (38, 16) and np.isfinite(feats).all()  # 1.5 s at 25 fps -> round(37.5) = 38
    with pytest.raises(McdmError, match="not a folder"):
        load_audio_encoder("wav2vec2", str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------ identity
def test_clip_backend_loads_local_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=12)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    backend = load_identity_encoder("clip", str(tmp_path / "clip"))
    emb = backend(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert backend.name == "clip" and emb.shape == (12,) and np.isfinite(emb).all()


def test_dlib_vae_identity_concatenates_descriptor_and_pooled_latent(tmp_path):
    from diffusers import AutoencoderKL
    from skimage import data

    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(tmp_path / "vae")
    backend = load_identity_encoder("dlib+vae", vae=load_vae(tmp_path / "vae"))
    img = data.astronaut()[60:200, 150:290]  # the face
    emb = backend(np.ascontiguousarray(img))
    assert backend.name == "dlib+vae" and emb.shape == (128 + 16,) == (backend.dim,)
    from mcdm.face.dlib import DlibFace

    np.testing.assert_allclose(emb[:128], DlibFace().descriptor(np.ascontiguousarray(img)), atol=1e-5)
    with pytest.raises(McdmError, match="no face"):
        backend(np.full((64, 64, 3), 128, np.uint8))
    with pytest.raises(McdmError, match="needs the VAE"):
        load_identity_encoder("dlib+vae")


# ------------------------------------------------------------------------------------ geometry
def project(points3d: np.ndarray, euler: tuple, trans, size: int) -> np.ndarray:
    rot = Rotation.from_euler("xyz", euler).as_matrix()  # R = Rz(roll) Ry(yaw) Rx(pitch)
    cam = points3d @ rot.T + np.asarray(trans)
    return cam[:, :2] / cam[:, 2:] * size + size / 2  # focal length = image width


def test_head_pose_recovers_known_rotation():
    size = 64
    poses = [(0.0, 0.0, 0.0), (0.15, -0.35, 0.1), (-0.25, 0.45, -0.2), (0.05, 0.2, 0.3)]
    trans = (0.3, -0.2, 3.5)
    lms = np.stack([project(FACE_3D_68, e, trans, size) for e in poses])
    hp = head_pose_from_landmarks(lms, size)
    assert hp.shape == (4, 6)
    np.testing.assert_allclose(hp[:, :3], np.array(poses), atol=1e-4)
    np.testing.assert_allclose(hp[:, 3:], np.tile(trans, (4, 1)), atol=1e-3)
    # pixel noise (0.3 px at 64 px): still within ~3 degrees
    noisy = lms + np.random.default_rng(0).normal(0, 0.3, lms.shape)
    assert np.abs(head_pose_from_landmarks(noisy, size)[:, :3] - np.array(poses)).max() < np.radians(3)
    with pytest.raises(McdmError, match="shape"):
        head_pose_from_landmarks(np.zeros((3, 5, 2)), size)


def similarity(points: np.ndarray, angle: float, scale: float, shift) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return scale * points @ np.array([[c, s], [-s, c]]) + np.asarray(shift)


def talking_landmarks(n: int, rng) -> np.ndarray:
    """A canonical face whose lower lip opens and whose brows rise over time."""
    lm = np.repeat(CANONICAL_68[None], n, 0).copy()
    opening = rng.uniform(0, 0.3, n)
    lm[:, [56, 57, 58, 65, 66, 67], 1] += opening[:, None]
    lm[:, 17:27, 1] -= rng.uniform(0, 0.1, n)[:, None]
    return lm


def test_expression_offsets_are_similarity_invariant_and_pose_normalised():
    rng = np.random.default_rng(0)
    lm = talking_landmarks(6, rng)
    base = expression_offsets(lm)
    assert base.shape == (6, 136)
    for angle, scale, shift in [(0.4, 23.0, (31.0, 40.0)), (-0.9, 0.5, (-3.0, 7.0))]:
        np.testing.assert_allclose(expression_offsets(similarity(lm, angle, scale, shift)), base, atol=1e-6)
    # a different similarity per frame (head moving in the image plane) is removed too
    moved = np.stack([similarity(f, a, s, (s, -s)) for f, a, s in zip(lm, rng.uniform(-1, 1, 6), rng.uniform(5, 50, 6))])
    np.testing.assert_allclose(expression_offsets(moved), base, atol=1e-6)
    # the motion lands on the moving points: rigid points stay near zero, the lower lip does not
    per_point = np.abs(base.reshape(6, 68, 2)).max((0, 2))
    assert per_point[RIGID_POINTS].max() < 1e-9 and per_point[57] > 0.1
    # neutral choices: template vs clip median vs given
    np.testing.assert_allclose(expression_offsets(lm, "template")[0], (lm[0] - CANONICAL_68).reshape(-1), atol=1e-9)
    np.testing.assert_allclose(expression_offsets(lm, neutral=lm[2]), expression_offsets(lm, "template") - (lm[2] - CANONICAL_68).reshape(-1), atol=1e-6)


def face_image(size: int, opening: float):
    """Gray face-like image with dark eyes and a dark mouth ellipse, and its 68 landmarks."""
    lm = CANONICAL_68 * size * 0.3 + [size / 2, size * 0.45]
    img = np.full((size, size, 3), 170, np.uint8)
    cv2.ellipse(img, tuple(int(v) for v in lm[48:68].mean(0)), (int(0.12 * size), int(2 + opening * size)), 0, 0, 360, (20, 20, 20), -1)
    for eye in (slice(36, 42), slice(42, 48)):
        cv2.circle(img, tuple(int(v) for v in lm[eye].mean(0)), int(0.03 * size), (0, 0, 0), -1)
    return img, lm


def test_mouth_crop_is_upright_scale_free_and_centred():
    img, lm = face_image(128, 0.06)
    crop = mouth_crop(img, lm)
    assert crop.shape == MOUTH_CROP_HW and crop.dtype == np.uint8
    assert crop[16, 24] < 60 and crop[1, 1] > 120  # dark mouth centred, light skin in the corner
    # rotating the image and its landmarks gives the same crop (the crop is upright)
    m = cv2.getRotationMatrix2D((64, 64), 25, 1.0)
    rot_img = cv2.warpAffine(img, m, (128, 128), borderValue=(170, 170, 170))
    rot_crop = mouth_crop(rot_img, lm @ m[:, :2].T + m[:, 2])
    assert np.abs(rot_crop.astype(int) - crop).mean() < 8
    # a 4x larger frame gives the same crop (area downsampling, crop size set by eye distance)
    big, big_lm = cv2.resize(img, (512, 512), interpolation=cv2.INTER_NEAREST), lm * 4 + 1.5
    assert np.abs(mouth_crop(big, big_lm).astype(int) - crop).mean() < 8
    # smoothing boxes over time: constant landmarks -> constant boxes
    boxes = mouth_boxes(np.repeat(lm[None], 5, 0))
    np.testing.assert_allclose(boxes, np.repeat(boxes[:1], 5, 0), atol=1e-4)
    np.testing.assert_array_equal(mouth_crop(img, box=boxes[0]), crop)


def test_landmark_heatmaps_peak_on_landmarks():
    lm = np.round(CANONICAL_68 * 12 + 32)
    maps = render_landmark_heatmaps(lm[None, None], 64)
    assert maps.shape == (1, 1, 1, 64, 64)
    pts = lm.astype(int)
    assert torch.all(maps[0, 0, 0, pts[:, 1], pts[:, 0]] > 0.999)
    assert maps[0, 0, 0, 0, 0] < 1e-3 and maps.max() <= 1.0


def test_landmark_heatmaps_equal_the_direct_gaussian_max():
    """The separable product equals max_i exp(-|p - l_i|^2 / (2 sigma^2)) computed directly."""
    lm = np.random.default_rng(0).uniform(-5, 37, size=(3, 68, 2)).astype(np.float32)
    grid = np.arange(32, dtype=np.float64)
    d2 = (grid[None, None, :, None] - lm[:, :, None, None, 1]) ** 2 + (grid[None, None, None, :] - lm[:, :, None, None, 0]) ** 2
    direct = np.exp(-d2 / (2 * 1.0**2)).max(1)
    np.testing.assert_allclose(render_landmark_heatmaps(lm, 32)[:, 0].numpy(), direct, atol=1e-6)


# ------------------------------------------------------------------------------------ modules
def _round_trip(model, inputs, tmp_path, fn=None):
    fn = fn or (lambda m, x: m(x))
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = load_strict(type(model), tmp_path)
    with torch.no_grad():
        a, b = fn(model, inputs), fn(loaded, inputs)
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x, y)
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_modules_forward_backward_and_round_trip(tmp_path):
    torch.manual_seed(0)
    mouths = torch.randint(0, 255, (3, 5, 32, 48), dtype=torch.uint8)
    lip = LipEncoder(window=5, lip_dim=8)
    out = lip(mouths)
    assert out.shape == (3, 8) and torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    lip.token_mean.fill_(0.1)
    _round_trip(lip, mouths, tmp_path / "lip")
    assert LipEncoder.from_pretrained(tmp_path / "lip").token_mean[0] == pytest.approx(0.1)
    assert lip.encode_clip(torch.randint(0, 255, (7, 32, 48), dtype=torch.uint8)).shape == (7, 8)

    audio = torch.randn(3, 5, 10)
    lip_audio = LipAudioEncoder(audio_dim=10, window=5, lip_dim=8)
    _round_trip(lip_audio, audio, tmp_path / "lip_audio")

    offsets = torch.randn(4, 136) * 0.05
    expr = ExpressionEncoder(expression_dim=6)
    code, recon = expr(offsets)
    assert code.shape == (4, 6) and recon.shape == (4, 136)
    _round_trip(expr, offsets, tmp_path / "expression")

    head = HeadPoseEncoder().fit(torch.randn(50, 6) * 3 + 1)
    poses = torch.randn(4, 6)
    np.testing.assert_allclose(head.decode(head(poses)).numpy(), poses.numpy(), atol=1e-5)
    _round_trip(head, poses, tmp_path / "head")

    guider = LandmarkGuider(block_out_channels=(4, 8, 8, 16))
    maps = render_landmark_heatmaps(np.stack([CANONICAL_68 * 12 + 32] * 2), 64)
    assert guider(maps).shape == (2, 4, 8, 8) and guider(maps).abs().max() == 0  # zero-initialised output
    assert guider.tokens(maps).shape == (2, guider.token_dim) == (2, 64)
    lm_tokens = guider.landmark_tokens(torch.as_tensor(np.stack([CANONICAL_68 * 12 + 32] * 6)).float().view(2, 3, 68, 2), 64)
    assert lm_tokens.shape == (2, 3, 64)
    _round_trip(guider, maps, tmp_path / "guider", fn=lambda m, x: (m(x), m.tokens(x)))

    # one backward through each trainable encoder
    loss = lip(mouths).sum() + lip_audio(audio).sum() + expr(offsets)[1].sum() + guider(maps).sum() + guider.tokens(maps).sum()
    loss.backward()
    for m in (lip, lip_audio, expr, guider):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), type(m).__name__


def test_load_strict_reports_missing_and_unexpected_weights(tmp_path):
    from safetensors.torch import load_file
    from safetensors.torch import save_file as save_torch

    ExpressionEncoder().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    weights.pop("decoder.0.bias")
    weights["stray"] = torch.zeros(1)
    save_torch(weights, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(McdmError, match="decoder.0.bias"):
        load_strict(ExpressionEncoder, tmp_path)
    with pytest.raises(McdmError, match="config.json"):
        load_strict(ExpressionEncoder, tmp_path / "nothing")


# ------------------------------------------------------------------------------------ stage
def write_synthetic_features(folder, n_clips: int = 4, n_frames: int = 60, audio_dim: int = 8, seed: int = 0):
    """Feature files in the features stage's contract, with a planted audio-visual relation: the mouth
    opening of frame t is a function of the audio of frame t (not of its neighbours)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w = rng.standard_normal(audio_dim)
    for i in range(n_clips):
        opening = rng.uniform(0, 1, n_frames)  # independent per frame: timing is identifiable
        audio = np.outer(opening, w) + 0.1 * rng.standard_normal((n_frames, audio_dim))
        mouths = np.full((n_frames, 32, 48), 160, np.uint8)
        for t, o in enumerate(opening):
            cv2.ellipse(mouths[t], (24, 16), (14, int(1 + 12 * o)), 0, 0, 360, 30, -1)
        lm = talking_landmarks(n_frames, rng) * 20 + 32
        save_file({
            "audio": audio.astype(np.float32), "mouth_crops": mouths, "landmarks": lm.astype(np.float32),
            "head_pose": rng.normal(0, [0.1, 0.2, 0.05, 0.1, 0.1, 0.3], (n_frames, 6)).astype(np.float32) + [0, 0, 0, 0, 0, 3],
            "ref_embedding": rng.standard_normal(144).astype(np.float32),
        }, str(folder / f"clip{i}.safetensors"))
    pd.DataFrame({"clip_id": [f"clip{i}" for i in range(n_clips)], "split": "train"}).to_parquet(folder / "index.parquet")
    return folder


def test_motion_encoders_stage_trains_saves_and_tokenises(tmp_path):
    from mcdm.train.motion_encoders import train_motion_encoders

    feats = write_synthetic_features(tmp_path / "features")
    params = Params.model_validate({"model": {"motion_encoder_steps": 40, "motion_encoder_batch_size": 16, "lip_dim": 8, "expression_dim": 6}})
    metrics = train_motion_encoders(feats, tmp_path / "enc", params, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["expression", "head", "lip", "lip_audio", "metrics.json"]
    assert not (tmp_path / "enc.tmp").exists()
    saved = json.loads((tmp_path / "enc" / "metrics.json").read_text())
    assert saved["n_clips"] == 4 and saved["n_val_clips"] == 1 and saved["lip_dim"] == 8
    assert metrics["lip_loss_last"] < metrics["lip_loss_first"]
    assert metrics["expression_loss_last"] < metrics["expression_loss_first"]
    # the planted sync is found well above chance on a held-out clip
    assert metrics["lip_sync_acc_val"] > 5 * metrics["lip_sync_acc_chance"]

    encoders = MotionEncoders.load(tmp_path / "enc")
    from safetensors.numpy import load_file

    tokens = encoders.tokens(load_file(str(feats / "clip0.safetensors")))
    assert tokens["head"].shape == (60, 6) and tokens["lip"].shape == (60, 8) and tokens["expression"].shape == (60, 6)
    allt = [encoders.tokens(load_file(str(feats / f"clip{i}.safetensors"))) for i in range(4)]
    for key in ("head", "lip", "expression"):  # standardised on the training clips
        cat = torch.cat([t[key] for t in allt])
        assert cat.mean(0).abs().max() < 1e-3 and (cat.std(0) - 1).abs().max() < 1e-2
    assert not any(p.requires_grad for p in encoders.lip.parameters())


def test_motion_encoders_command(tmp_path):
    from mcdm.cli import main

    feats = write_synthetic_features(tmp_path / "features", n_clips=2, n_frames=40)
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  motion_encoder_steps: 3\n  motion_encoder_batch_size: 4\n")
    assert main(["--params", str(params), "motion-encoders", "--features", str(feats), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "lip" / "config.json").exists()
    # a missing features stage is one line naming the stage to run
    assert main(["--params", str(params), "motion-encoders", "--features", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
