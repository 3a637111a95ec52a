"""SyncNet: MFCC front end, the offset / confidence algorithm, models, training and the sync filter.

The maths is pinned against independent references (scipy's DCT and STFT, closed forms of the mel
scale); training runs on synthetic talking mouths (a dark mouth whose opening follows the loudness of
a voiced tone), so the test can check that SyncNet learns the audio-lip correspondence and that the
filter finds a planted 8-frame (0.32 s) audio delay.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.fft
import scipy.signal
import torch

from mcdm.config import SyncNetParams
from mcdm.models.sync import mfcc as M
from mcdm.models.sync.offset import av_offset
from mcdm.models.sync.syncnet import OfficialSyncNet, SyncNet, load_syncnet

FPS = 25
RATE = 16_000


# ------------------------------------------------------------------------------ synthetic clips
def synthetic_clip(seed: int, seconds: float = 8.0, size: int = 64, delay_frames: int = 0):
    """RGB frames (T, size, size, 3), 16 kHz audio and (T, 68, 2) landmarks of a talking mouth.

    The loudness envelope is a random run of syllables (2-7 frames on, 1-6 off); the mouth opening
    (a dark rectangle) follows it frame by frame; the audio is a voiced tone (random pitch, 4
    harmonics) with that envelope. ``delay_frames`` delays the audio (it lags the lips).
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * FPS)
    env = np.zeros(n)
    t = int(rng.integers(0, 4))
    while t < n:
        on = int(rng.integers(2, 8))
        env[t : t + on] = rng.uniform(0.4, 1.0)
        t += on + int(rng.integers(1, 7))
    env = np.convolve(env, [0.25, 0.5, 0.25], mode="same")
    # audio: envelope per sample (linear interpolation of the per-frame envelope), voiced tone
    ts = np.arange(n * RATE // FPS) / RATE
    env_s = np.interp(ts, (np.arange(n) + 0.5) / FPS, env)
    f0 = rng.uniform(110, 240)
    tone = sum(np.sin(2 * np.pi * f0 * h * ts + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 5))
    audio = 0.3 * env_s * tone + 0.003 * rng.standard_normal(ts.size)
    if delay_frames:
        audio = np.concatenate([0.003 * rng.standard_normal(delay_frames * RATE // FPS), audio])[: ts.size]
    # video: face disc, mouth rectangle whose height follows the envelope
    yy, xx = np.mgrid[:size, :size]
    face = np.where(((xx - size / 2) / (0.38 * size)) ** 2 + ((yy - size / 2) / (0.46 * size)) ** 2 < 1, 170.0, 70.0)
    cx, cy, half_w = size / 2, 0.72 * size, 0.14 * size
    frames = np.empty((n, size, size, 3), np.uint8)
    landmarks = np.zeros((n, 68, 2), np.float32)
    jaw = np.stack([size / 2 + 0.38 * size * np.cos(np.linspace(np.pi, 0, 17)),
                    size / 2 + 0.46 * size * np.sin(np.linspace(np.pi, 0, 17)) * 0.9], 1)
    for i in range(n):
        half_h = 0.5 + 0.12 * size * env[i]
        img = face.copy()
        img[(np.abs(xx - cx) <= half_w) & (np.abs(yy - cy) <= half_h)] = 30.0
        img += rng.normal(0, 4, img.shape)
        frames[i] = np.clip(img, 0, 255)[..., None].astype(np.uint8)
        ang = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        landmarks[i, 48:60] = np.stack([cx + half_w * np.cos(ang), cy + half_h * np.sin(ang)], 1)
        ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
        landmarks[i, 60:68] = np.stack([cx + 0.7 * half_w * np.cos(ang), cy + 0.7 * half_h * np.sin(ang)], 1)
        landmarks[i, :17] = jaw
    return frames, audio.astype(np.float32), landmarks


# ------------------------------------------------------------------------------------ MFCC
def test_dct_matrix_matches_scipy():
    x = np.random.default_rng(0).standard_normal((7, 26))
    ref = scipy.fft.dct(x, type=2, norm="ortho", axis=1)[:, :13]
    np.testing.assert_allclose(x @ M.dct_matrix(26, 13).T, ref, atol=1e-12)


def test_mel_scale_and_filterbank_closed_form():
    assert M.hz_to_mel(700.0) == pytest.approx(2595 * math.log10(2))
    hz = np.array([0.0, 300.0, 1000.0, 7999.0])
    np.testing.assert_allclose(M.mel_to_hz(M.hz_to_mel(hz)), hz, atol=1e-9)
    bank = M.mel_filterbank()
    assert bank.shape == (26, 257)
    # triangle j: 0 at bin b_j, 1 at b_{j+1}, 0 at b_{j+2}; b from mel-spaced edges 0 .. 8 kHz
    edges = M.mel_to_hz(np.linspace(0, M.hz_to_mel(8000), 28))
    b = np.floor(513 * edges / 16000).astype(int)
    k = np.arange(257)[None, :]
    lo, mid, hi = b[:-2, None], b[1:-1, None], b[2:, None]
    ref = np.clip(np.minimum((k - lo) / (mid - lo), (hi - k) / (hi - mid)), 0, None)
    ref[k >= hi] = 0
    np.testing.assert_allclose(bank, ref, atol=1e-12)
    assert np.all(bank.max(axis=1) == 1.0)


def test_power_spectrum_matches_scipy_stft():
    x = np.random.default_rng(1).standard_normal(5000)
    emph = np.append(x[0], x[1:] - 0.97 * x[:-1])
    _, _, z = scipy.signal.stft(emph, window="boxcar", nperseg=400, noverlap=240, nfft=512,
                                boundary=None, padded=False, detrend=False, scaling="spectrum")
    ref = (np.abs(z * 400) ** 2 / 512).T  # scaling="spectrum" divides by sum(window) = 400
    ours = M.power_frames(x)
    assert ours.shape[0] == M.n_mfcc_frames(5000) == 1 + math.ceil((5000 - 400) / 160)
    np.testing.assert_allclose(ours[: len(ref)], ref, rtol=1e-9, atol=1e-9)


def test_mfcc_rate_shape_and_tone():
    one_second = np.zeros(16000)
    assert M.mfcc(one_second + 1e-3).shape == (13, 99)  # 100 Hz; last partial frame padded
    # windows: 4 MFCC frames per video frame at 25 fps; 4 s -> 100 frames but 399 MFCC frames, so the
    # last window (MFCC 380..399) is incomplete: 95 windows, as the reference's `min_length - 5`
    assert M.n_mfcc_frames(64000) == 399
    assert M.n_windows(100, 399) == 95 and M.n_windows(100, 400) == 96
    # a 1 kHz tone (FFT bin 32 exactly): the loudest mel band is the one whose triangle peaks
    # nearest bin 32, i.e. the band centred within one band spacing of 1 kHz
    t = np.arange(16000) / 16000
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    power = M.power_frames(tone)
    assert np.argmax(power.mean(0)) == 32
    loudest = int(np.argmax((power @ M.mel_filterbank().T).mean(0)))
    centres = M.mel_to_hz(np.linspace(0, M.hz_to_mel(8000), 28))[1:-1]
    assert loudest == int(np.argmax(M.mel_filterbank()[:, 32]))
    assert abs(centres[loudest] - 1000) < np.diff(centres)[loudest]
    np.testing.assert_allclose(M.mfcc(tone)[0], np.log(power.sum(1)), rtol=1e-5)
    with pytest.raises(ValueError, match="16000"):
        M.mfcc(tone, rate=8000)


# --------------------------------------------------------------------------- offset search
def _brute_force(v: np.ndarray, a: np.ndarray, K: int) -> np.ndarray:
    """D_k = mean_t ||v_t - a_{t+k}||, a_{t+k} := 0 outside the clip: plain loops."""
    T = len(v)
    out = []
    for k in range(-K, K + 1):
        d = [np.linalg.norm(v[t] - (a[t + k] if 0 <= t + k < T else 0.0)) for t in range(T)]
        out.append(np.mean(d))
    return np.array(out)


@pytest.mark.parametrize("delay", [-8, -3, 0, 5, 8])
def test_av_offset_finds_planted_shift(delay):
    rng = np.random.default_rng(delay + 20)
    T, D, K = 80, 16, 15
    v = rng.standard_normal((T, D))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    # audio delayed by `delay` frames: the sound of video frame t is at audio frame t + delay
    a = np.zeros_like(v)
    src = np.arange(T) - delay
    ok = (src >= 0) & (src < T)
    a[ok] = v[src[ok]]
    a[~ok] = rng.standard_normal((int((~ok).sum()), D))
    a += 0.1 * rng.standard_normal(a.shape)
    res = av_offset(v, a, max_offset=K)
    assert res.offset == -delay  # negative offset: audio lags video
    ref = _brute_force(v, a, K)
    np.testing.assert_allclose(res.mean_dists, ref, rtol=1e-10)
    assert res.min_dist == pytest.approx(ref.min())
    assert res.conf == pytest.approx(np.median(ref) - ref.min())
    assert res.frame_dists.shape == (T, 2 * K + 1)


def test_av_offset_rejects_mismatched_embeddings():
    with pytest.raises(ValueError, match="must both be"):
        av_offset(np.zeros((5, 4)), np.zeros((6, 4)))


# ---------------------------------------------------------------------------------- models
def test_syncnet_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SyncNet(mouth_height=16, mouth_width=24, channels=(8, 16), embed_dim=16).eval()
    video, audio = torch.rand(3, 1, 5, 16, 24), torch.randn(3, 1, 13, 20)
    with torch.no_grad():
        v, a = model.embed_video(video), model.embed_audio(audio)
    assert v.shape == a.shape == (3, 16)
    np.testing.assert_allclose(v.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    model.save_pretrained(tmp_path / "sn")
    assert (tmp_path / "sn" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((tmp_path / "sn" / "config.json").read_text())["_class_name"] == "SyncNet"
    loaded = load_syncnet(tmp_path / "sn")
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_video(video), v)
        torch.testing.assert_close(loaded.embed_audio(audio), a)
    loss = model.train()(video, audio).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_official_layout_loads_a_state_dict(tmp_path):
    from mcdm.errors import McdmError

    model = OfficialSyncNet()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # the released syncnet_v2 layout (joonson/syncnet_python): first / last layers of each stream
    assert shapes["netcnnaud.0.weight"] == (64, 1, 3, 3)
    assert shapes["netcnnaud.18.weight"] == (512, 256, 5, 4)
    assert shapes["netcnnlip.0.weight"] == (96, 3, 5, 7, 7)
    assert shapes["netcnnlip.18.weight"] == (512, 256, 1, 6, 6)
    assert shapes["netfcaud.3.weight"] == shapes["netfclip.3.weight"] == (1024, 512)
    # an old-PyTorch style file: legacy (non-zip) pickle, no num_batches_tracked counters
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "syncnet_v2.model"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    loaded = load_syncnet(path)
    assert isinstance(loaded, OfficialSyncNet) and not loaded.training
    torch.testing.assert_close(loaded.netcnnlip[0].weight, state["netcnnlip.0.weight"])
    with torch.no_grad():
        emb = loaded.embed_audio(torch.randn(2, 1, 13, 20))
    assert emb.shape == (2, 1024)
    # the scoring path feeds it 224 px BGR face windows and MFCCs of int16-scaled audio
    from mcdm.models.sync.scoring import sync_scores

    frames = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    scores = sync_scores(frames, np.zeros(8 * 640, np.float32) + 1e-3, model=loaded, max_offset=2)
    assert scores["sync_backend"] == "syncnet_official"
    assert scores["n_windows"] == M.n_windows(8, M.n_mfcc_frames(8 * 640)) == 3
    del state["netfclip.3.bias"]
    torch.save(state, path)
    with pytest.raises(McdmError, match="missing"):
        load_syncnet(path)


# ----------------------------------------------------------- training + filter on synthetic clips
def _write_clips(root, specs):
    """Synthetic face-crop mp4s (audio muxed) + landmarks npz + a quality-style table and manifest."""
    from mcdm.media.io import write_video

    rows, manifest = [], []
    for clip_id, seed, delay in specs:
        frames, audio, landmarks = synthetic_clip(seed, seconds=6.0, delay_frames=delay)
        crop = write_video(root / "crops" / f"{clip_id}.mp4", frames, FPS, audio, RATE)
        lm = root / "landmarks" / f"{clip_id}.npz"
        lm.parent.mkdir(parents=True, exist_ok=True)
        np.savez(lm, landmarks=landmarks, boxes=np.zeros((len(frames), 4), np.float32),
                 detected=np.ones(len(frames), bool))
        file = f"{clip_id}.mp4"
        rows.append({"clip_id": clip_id, "video_id": clip_id, "source_id": f"id{seed}", "file": file,
                     "n_frames": len(frames), "crop_path": str(crop), "landmarks_path": str(lm),
                     "face_px": 120.0, "detect_rate": 1.0, "sharpness": 50.0, "brightness": 120.0,
                     "blockiness": 1.0, "quality_backend": "classical"})
        manifest.append({"file": file, "identity": f"id{seed}", "kind": "av_shift" if delay else "clean",
                         "audio_shift_s": delay / FPS})
    return pd.DataFrame(rows), pd.DataFrame(manifest)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny SyncNets trained by the stage function on 12 synthetic one-clip identities (one planted
    8-frame delay), in two folds."""
    from mcdm.config import Params
    from mcdm.train.syncnet import run_syncnet_train

    root = tmp_path_factory.mktemp("sync")
    specs = [(f"c{i}", i, 0) for i in range(11)] + [("c_planted", 50, 8)]
    table, manifest = _write_clips(root, specs)
    table.to_parquet(root / "kept.parquet")
    manifest.to_csv(root / "manifest.csv", index=False)
    params = Params(seed=0)
    params.data.workers = 1
    params.data.syncnet = SyncNetParams(train_steps=120, batch_size=16, channels=[16, 32, 64, 64], embed_dim=32,
                                        holdout_fraction=0.25, min_confidence=0.2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: one thread is fastest on a shared 2-core machine
    try:
        metrics = run_syncnet_train(root / "kept.parquet", root / "model", params, manifest_path=root / "manifest.csv")
        yield root, params, metrics
    finally:
        torch.set_num_threads(threads)


def test_training_separates_in_sync_from_shifted(trained):
    root, _, m = trained
    assert (root / "model" / "diffusion_pytorch_model.safetensors").is_file()
    saved = json.loads((root / "model" / "metrics.json").read_text())
    assert saved["heldout_pair_auc"] == pytest.approx(m["heldout_pair_auc"])
    # two folds of identities (12 one-clip groups: 2 open-set, 1 test -> cross_fit; 9 training -> metric)
    table = pd.read_csv(root / "model" / "training_clips.csv")
    assert m["folds"]["metric"]["clips"] == 9 and m["folds"]["cross_fit"]["clips"] == 3
    assert set(table.loc[table["fold"] == "metric", "role"]) == {"train"}
    assert (root / "model" / "cross_fit" / "config.json").is_file()
    assert m["heldout_clips"] >= 2 and m["train_clips"] + m["heldout_clips"] == 9
    assert m["cross_fit"]["train_clips"] + m["cross_fit"]["heldout_clips"] == 3
    assert m["train_clips"] == int(((table["fold"] == "metric") & (table["use"] == "trained")).sum())
    # the planted clip is in the table and is counted where it went (a fold's training or held-out clips)
    assert m["planted_out_of_sync_in_table"] == 1
    assert sum(f[k] for f in (m, m["cross_fit"]) for k in ("planted_out_of_sync_in_train",
                                                            "planted_out_of_sync_in_heldout")) == 1
    assert m["heldout_pair_auc"] > 0.8, m
    assert m["heldout_pair_accuracy"] > 0.7, m
    assert m["heldout_offset_within_1"] == 1.0, m


def test_sync_filter_rejects_planted_delay(trained, tmp_path):
    from mcdm.data.sync_filter import sync_filter

    root, params, _ = trained
    table, _ = _write_clips(tmp_path, [("h_clean", 200, 0), ("h_late", 201, 8)])  # never trained on
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    table = pd.concat([table, table.iloc[[0]].assign(clip_id="h_broken", file="broken.mp4", crop_path=str(bad))])
    summary = sync_filter(table, root / "model", params, tmp_path / "sync")
    kept = pd.read_parquet(tmp_path / "sync" / "kept.parquet")
    rejects = pd.read_csv(tmp_path / "sync" / "rejects.csv")
    scores = pd.read_csv(tmp_path / "sync" / "scores.csv").set_index("clip_id")
    assert list(kept["clip_id"]) == ["h_clean"]
    assert {"av_offset", "sync_conf", "sync_dist", "sharpness"} <= set(kept.columns)
    assert abs(int(kept["av_offset"].iloc[0])) <= 1
    assert scores.loc["h_late", "av_offset"] == -8  # audio 0.32 s late: offset -8 frames
    assert scores.loc["h_clean", "sync_conf"] > scores.loc["h_late", "sync_conf"] - 1.0
    reasons = dict(zip(rejects["file"], rejects["reason"]))
    assert reasons["h_late.mp4"].startswith("av_offset: |-8| > 3 frames [clip h_late]")
    assert reasons["broken.mp4"].startswith("unreadable:")
    assert summary.kept == 1 and summary.rejected == {"av_offset": 1, "unreadable": 1}
