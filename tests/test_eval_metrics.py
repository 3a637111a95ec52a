"""Evaluation metrics pinned against independent references (scipy sqrtm, scikit-image SSIM, closed
forms), sanity baselines, the labelled dlib fallbacks and the TorchScript backends' call conventions."""
from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import scipy.linalg
import skimage.data
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from mcdm.config import EvalParams
from mcdm.errors import McdmError
from mcdm.eval import metrics as M
from mcdm.eval.face_features import DlibFrameFeatures
from mcdm.eval.frechet import feature_stats, frechet_distance, frechet_from_features
from mcdm.eval.landmark_features import DynamicsVideoFeatures, expression_template, landmark_expression_features
from mcdm.eval.suite import MetricSuite

# ------------------------------------------------------------------------------------------------
# Fréchet distance


def _reference_fd(x: np.ndarray, y: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), straight from scipy."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_matches_scipy_sqrtm_reference(method):
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(24, 24))
    x = rng.normal(size=(300, 24)) @ mix
    y = rng.normal(size=(250, 24)) @ (mix + 0.3 * rng.normal(size=(24, 24))) + 0.5
    assert frechet_from_features(x, y, method=method) == pytest.approx(_reference_fd(x, y), abs=1e-6)


def test_frechet_closed_forms():
    # diagonal covariances: d^2 = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-12)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + 1, abs=1e-12)


def test_frechet_singular_covariances_fewer_samples_than_dims():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 60)), rng.normal(size=(15, 60)) + 0.2
    mu, sigma = feature_stats(x)
    assert np.linalg.matrix_rank(sigma) < 60
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9 * np.trace(sigma))
    low_rank = frechet_from_features(x, y)  # SVD of the 12 x 15 sample product
    eig = frechet_distance(*feature_stats(x), *feature_stats(y))  # 60 x 60 eigen-decompositions
    sq = frechet_from_features(x, y, method="sqrtm")  # pytorch-fid's route, eps offset when needed
    assert low_rank == pytest.approx(eig, rel=1e-9) and low_rank == pytest.approx(sq, rel=1e-4)
    assert frechet_from_features(x, x) == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------------------------
# SSIM


def _skimage_ssim(a, b, data_range, channel_axis):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=data_range, channel_axis=channel_axis)


def test_ssim_matches_skimage():
    rng = np.random.default_rng(2)
    a = skimage.data.astronaut()[100:160, 150:198]  # (60, 48, 3)
    b = np.clip(a.astype(int) + rng.normal(0, 20, a.shape).round(), 0, 255).astype(np.uint8)
    expected = _skimage_ssim(a, b, 255, -1)
    assert M.ssim(a, b, data_range=255) == pytest.approx(expected, abs=1e-6)
    # batches (numpy and torch, channel-last) give one value per image
    batch = M.ssim(np.stack([a, b]), np.stack([b, b]), data_range=255)
    assert batch[0] == pytest.approx(expected, abs=1e-6) and batch[1] == pytest.approx(1.0, abs=1e-12)
    assert M.ssim(torch.from_numpy(a), torch.from_numpy(b), data_range=255) == pytest.approx(expected, abs=1e-6)
    # grayscale floats with an explicit data range
    g1, g2 = rng.random((40, 52)), rng.random((40, 52)) * 0.5 + 0.25
    assert M.ssim(g1, g2, data_range=1.0, channel_axis=None) == pytest.approx(_skimage_ssim(g1, g2, 1.0, None), abs=1e-6)


# ------------------------------------------------------------------------------------------------
# dlib-based fallbacks on a synthetic talking head (astronaut's face, smooth head motion, 64 px)


def _head_video(phase: float, n: int = 32, side: int = 64) -> np.ndarray:
    face = skimage.data.astronaut()[20:260, 100:340]
    frames = []
    for t in range(n):
        warp = cv2.getRotationMatrix2D((120.0, 120.0), 6 * np.sin(2 * np.pi * t / 24 + phase),
                                       1 + 0.04 * np.sin(2 * np.pi * t / 31 + phase))
        warp[:, 2] += [8 * np.sin(2 * np.pi * t / 29 + phase), 5 * np.cos(2 * np.pi * t / 37 + phase)]
        moved = cv2.warpAffine(face, warp, (240, 240), borderMode=cv2.BORDER_REFLECT)
        frames.append(cv2.resize(moved, (side, side), interpolation=cv2.INTER_AREA))
    return np.stack(frames)


@pytest.fixture(scope="module")
def faces():
    return DlibFrameFeatures()


@pytest.fixture(scope="module")
def heads():
    real = [_head_video(p) for p in (0.0, 3.1)]
    other = [_head_video(p) for p in (1.5, 4.6)]
    rng = np.random.default_rng(0)
    shuffled = [v[rng.permutation(len(v))] for v in real]
    return real, other, shuffled


def test_fvd_fallback_zero_for_identical_sets_and_large_for_shuffled_frames(faces, heads):
    real, other, shuffled = heads
    backend = DynamicsVideoFeatures(faces)
    same = M.fvd(real, [v.copy() for v in real], backend)
    assert same.backend == "fvd-fallback:dlib-descriptor+landmark-dynamics" and same.n == 4
    assert same.value == pytest.approx(0.0, abs=1e-8)
    assert same.details["no_face_clips_real"] == same.details["no_face_clips_fake"] == 0
    assert all(same.details[f"part_{p}"] == pytest.approx(0.0, abs=1e-8)
               for p in ("appearance", "motion", "mean_signals", "frame_change"))
    smooth = M.fvd(real, other, backend).value  # same face, same kind of motion, other phase
    jumbled = M.fvd(real, shuffled, backend)  # same frames, temporal order destroyed
    assert jumbled.value > 5 * smooth > 0
    # the parts say why: the shuffled clips hold the same frames (appearance: per-clip mean and std
    # of 4 of 16 frames' descriptors, close) but move wrong (velocity and frame-change spectra)
    parts = {p: jumbled.details[f"part_{p}"] for p in ("appearance", "motion", "frame_change")}
    assert parts["motion"] > 10 * parts["appearance"] and parts["frame_change"] > parts["appearance"]


def test_clip_dynamics_parts_tile_the_feature_vector():
    from mcdm.eval.landmark_features import SIGNALS, clip_dynamics, clip_dynamics_parts

    for t in (16, 15, 8):
        rng = np.random.default_rng(t)
        vec = clip_dynamics(rng.integers(0, 255, (t, 8, 8, 3)).astype(np.uint8), rng.normal(size=(t, len(SIGNALS))),
                            rng.normal(size=(t // 4 + 1, 128)), fps=25.0)
        parts = clip_dynamics_parts(t)
        covered = np.concatenate([np.arange(len(vec))[s] for s in parts.values()])
        np.testing.assert_array_equal(covered, np.arange(len(vec)))


def test_prefetch_in_dask_workers_gives_the_in_process_analysis(heads):
    """Faces analysed in 2 LocalCluster processes (evaluate's prefetch) equal the lazy in-process
    analysis bit for bit; descriptors only where asked, and nothing is redone."""
    from mcdm.eval.video_metrics import descriptor_frames

    video = heads[0][0][:12]
    want = descriptor_frames(len(video), stride=2, clip_frames=8, descriptor_every=4)
    assert want.tolist() == [True, False] * 6
    lazy = DlibFrameFeatures()
    pooled = DlibFrameFeatures()
    assert pooled.prefetch(video, want, workers=2, min_frames=13) == 0  # below the threshold: nothing
    assert pooled.prefetch(video, want, workers=2) == 12
    assert all(pooled._cache[pooled._key(f)].descriptor is not None for f in video[want])
    assert all(pooled._cache[pooled._key(f)].descriptor is None for f in video[~want])
    np.testing.assert_array_equal(pooled.landmarks(video), lazy.landmarks(video))
    np.testing.assert_array_equal(pooled.descriptors(video[want]), lazy.descriptors(video[want]))
    assert pooled.prefetch(video, want, workers=2) == 0  # all done already
    assert pooled.prefetch(video, None, workers=2) == 6  # now the other frames' descriptors


def test_ground_truth_vs_itself_and_static_reference(faces, heads):
    real = heads[0]
    suite = MetricSuite(EvalParams(frame_stride=4), faces=faces)
    refs = np.stack([v[0] for v in real])
    rows = suite.baselines(real, refs)
    gt, static = rows["ground_truth"], rows["static_reference"]
    assert gt["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert gt["fid"] == pytest.approx(0.0, abs=1e-8) and gt["fid_backend"] == "dlib-descriptor-128"
    assert gt["fid_no_face_frames_fake"] == 0 and gt["fid_n"] == 16
    assert gt["fvd"] == pytest.approx(0.0, abs=1e-8) and gt["efid"] == pytest.approx(0.0, abs=1e-10)
    assert gt["efid_backend"] == "landmark-expression-offsets"
    assert gt["identity"] == gt["identity_gt"] and gt["identity_gap"] == 0.0
    # the reference frame repeated: identity 0 and no drift by construction, but no motion at all
    assert static["identity"] == 0.0 and static["identity_drift"] == 0.0
    assert static["fvd"] > 1.0 and static["ssim"] < 1.0


def test_identity_same_portrait_near_zero_other_person_far(faces):
    astronaut = skimage.data.astronaut()
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    shifted = [np.roll(astronaut, (dy, dx), axis=(0, 1)) for dy, dx in ((0, 0), (3, -2), (-4, 5))]
    brighter = np.clip(astronaut.astype(int) + 12, 0, 255).astype(np.uint8)
    same = M.identity_curve(astronaut, shifted + [brighter], faces)
    assert same[0] == 0.0 and np.all(same < 0.2)
    other = M.identity_curve(astronaut, [hopper], faces)[0]
    assert 0.6 < other < 0.8  # dlib's different-person threshold is 0.6
    cos_same = M.identity_curve(astronaut, shifted[1], faces, metric="cosine")[0]
    cos_other = M.identity_curve(astronaut, hopper, faces, metric="cosine")[0]
    assert 0.95 < cos_same <= 1.0 and cos_other < cos_same
    # a frame without a face is NaN and counted, not dropped
    blank = np.full_like(astronaut, 127)
    curve = M.identity_curve(astronaut, [astronaut, blank], faces)
    assert curve[0] == 0.0 and np.isnan(curve[1])
    with pytest.raises(McdmError, match="no face found in the reference"):
        M.identity_curve(blank, [astronaut], faces)


def test_identity_summary_drift_and_ground_truth():
    curve = np.array([0.1] * 5 + [0.2] * 10 + [0.4] * 5)  # 20 frames: first 10% = 2 frames, last 2
    gt = np.full(20, 0.15)
    s = M.identity_summary(curve, gt)
    assert s["identity"] == pytest.approx(curve.mean()) and s["identity_drift"] == pytest.approx(0.3)
    assert s["identity_gt"] == pytest.approx(0.15) and s["identity_gt_drift"] == pytest.approx(0.0)
    assert s["identity_gap"] == pytest.approx(curve.mean() - 0.15)
    with_gap = M.identity_summary([np.r_[curve, np.nan]], None)  # a lost face: charged, counted (21 frames)
    assert with_gap["identity_no_face_frames"] == 1 and with_gap["identity_n"] == 21
    assert with_gap["identity"] == pytest.approx((curve.sum() + 1.0) / 21)


# ------------------------------------------------------------------------------------------------
# E-FID fallback: pose-normalised landmark expression offsets


def _similarity(lm, angle, scale, shift):
    c, s = np.cos(angle), np.sin(angle)
    return scale * lm @ np.array([[c, s], [-s, c]]) + shift


def test_efid_fallback_invariant_to_similarity_transforms(faces):
    base = faces.landmarks(skimage.data.astronaut())[0]
    rng = np.random.default_rng(3)
    # expressions: mouth opening and brow raise of varying amount
    shapes = []
    for _ in range(40):
        lm = base.copy()
        lm[57:60, 1] += rng.uniform(0, 8)
        lm[65:68, 1] += rng.uniform(0, 8)
        lm[17:27, 1] -= rng.uniform(0, 3)
        shapes.append(lm)
    shapes = np.stack(shapes)
    moved = np.stack([_similarity(lm, rng.uniform(-0.5, 0.5), rng.uniform(0.4, 2.5), rng.uniform(-100, 100, 2))
                      for lm in shapes])
    template = expression_template(shapes)
    np.testing.assert_allclose(expression_template(moved), template, atol=1e-9)
    np.testing.assert_allclose(expression_template(moved[::-1]), template, atol=1e-9)  # order does not matter
    # each frame against its identity's neutral shape (here: the same person's, in any pose)
    neutral_moved = np.stack([_similarity(base, rng.uniform(-0.5, 0.5), rng.uniform(0.4, 2.5), rng.uniform(-100, 100, 2))
                              for _ in shapes])
    np.testing.assert_allclose(landmark_expression_features(moved, neutral_moved),
                               landmark_expression_features(shapes, base), atol=1e-9)
    same = M.efid(shapes, moved, real_neutral=base, fake_neutral=neutral_moved)
    assert same.backend == "landmark-expression-offsets" and same.value == pytest.approx(0.0, abs=1e-10)
    wider = shapes.copy()
    wider[:, 57:60, 1] += 6  # every mouth opened further: a real expression change
    assert M.efid(shapes, wider, real_neutral=base, fake_neutral=base).value > 1e-3


# ------------------------------------------------------------------------------------------------
# TorchScript backends given by local path (tiny modules with the real call conventions)


class TinyInception(torch.nn.Module):
    """``detector(img uint8 NCHW, return_features=True) -> (N, 2048)``, like inception-2015-12-05.pt."""

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(48, 2048, generator=torch.Generator().manual_seed(0)))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.dim() != 4 or img.shape[1] != 3 or not return_features:
            raise RuntimeError("expected uint8 (N, 3, H, W) and return_features=True")
        pooled = torch.nn.functional.adaptive_avg_pool2d(img.float() / 255.0, 4).flatten(1)
        return pooled @ self.proj


class TinyI3D(torch.nn.Module):
    """``detector(video uint8 NCTHW, rescale=True, resize=True, return_features=True) -> (N, 400)``."""

    def forward(self, video: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if video.dtype != torch.uint8 or video.dim() != 5 or video.shape[1] != 3 or video.shape[2] != 16:
            raise RuntimeError("expected uint8 (N, 3, 16, H, W)")
        if not (rescale and resize and return_features):
            raise RuntimeError("expected rescale=True, resize=True, return_features=True")
        x = video.float() / 127.5 - 1.0  # rescale to [-1, 1]
        motion = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # (N, 15)
        return torch.cat([motion, x.mean(dim=(2, 3, 4))], dim=1).repeat(1, 22)[:, :400]


class TinyDeep3D(torch.nn.Module):
    """``net(img float (N, 3, 224, 224) in [0, 1]) -> (N, 257)`` coefficients."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.dtype != torch.float32 or img.shape[1] != 3 or img.shape[2] != 224 or img.shape[3] != 224 \
                or float(img.max()) > 1.0:
            raise RuntimeError("expected float (N, 3, 224, 224) in [0, 1]")
        rows = torch.nn.functional.adaptive_avg_pool2d(img, (86, 1)).flatten(1)  # (N, 258)
        return rows[:, :257]


def test_torchscript_backends_load_from_path_and_follow_call_conventions(tmp_path):
    paths = {}
    for name, module in (("inception-2015-12-05.pt", TinyInception()), ("i3d_torchscript.pt", TinyI3D()),
                         ("deep3d.pt", TinyDeep3D())):
        paths[name] = tmp_path / name
        with warnings.catch_warnings():  # torch 2.13 deprecates jit.script; the detectors we load are TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.script(module).save(str(paths[name]))
    params = EvalParams(inception_path=str(paths["inception-2015-12-05.pt"]), i3d_path=str(paths["i3d_torchscript.pt"]),
                        deep3d_path=str(paths["deep3d.pt"]))
    suite = MetricSuite(params)
    assert suite.backends["fid"] == "inception-v3-2048:inception-2015-12-05.pt"
    assert suite.backends["fvd"] == "i3d-400:i3d_torchscript.pt"
    assert suite.backends["efid"] == "deep3d-exp-64:deep3d.pt"

    rng = np.random.default_rng(4)
    real = rng.integers(0, 256, (2, 32, 24, 24, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-40, 40, real.shape), 0, 255).astype(np.uint8)
    frames_r, frames_f = real.reshape(-1, 24, 24, 3), fake.reshape(-1, 24, 24, 3)
    assert M.fid(frames_r, frames_r, suite.fid_backend).value == pytest.approx(0.0, abs=1e-8)
    assert M.fid(frames_r, frames_f, params.inception_path).value > 0
    same, diff = M.fvd(real, real, suite.fvd_backend), M.fvd(real, fake, params.i3d_path)
    assert same.n == 4 and same.value == pytest.approx(0.0, abs=1e-8) and diff.value > 0
    lm = np.tile(np.stack(np.meshgrid(np.linspace(5, 19, 17), np.linspace(5, 19, 4)), -1).reshape(68, 2), (64, 1, 1))
    e = M.efid(lm, lm, suite.efid_backend, real_frames=frames_r, fake_frames=frames_f)
    assert e.backend == "deep3d-exp-64:deep3d.pt" and e.n == 64 and e.value > 0

    # one-line errors: a missing file, a file that is not TorchScript, a detector with another convention
    with pytest.raises(McdmError, match="eval.inception_path: .* not found"):
        M.fid(frames_r, frames_f, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(McdmError, match="not a TorchScript file"):
        M.fvd(real, fake, tmp_path / "junk.pt")
    with pytest.raises(McdmError, match="i3d_torchscript.pt failed on input"):
        M.fid(frames_r, frames_f, paths["i3d_torchscript.pt"])


def test_sync_adapter_wraps_mcdm_sync():
    from mcdm.models.sync.syncnet import SyncNet

    torch.manual_seed(0)
    model = SyncNet().eval()
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    audio = rng.normal(0, 0.1, 16000 * 40 // 25).astype(np.float32)
    out = M.sync_metrics(frames, audio, model)
    assert set(out) == {"sync_c", "sync_d", "av_offset"}
    assert out["sync_c"].backend == "syncnet_trained" and out["sync_c"].n > 0
    assert np.isfinite(out["sync_c"].value) and out["sync_d"].value >= 0
