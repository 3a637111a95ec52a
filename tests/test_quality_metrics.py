"""Issue #20's measures pinned against independent references: the mouth-opening correlation
(hand-built landmarks, numpy's corrcoef, lost faces charged), the Laplacian-variance sharpness
(a numpy 3x3 convolution with reflected borders), PSNR (closed form), and the targets' checks."""
from __future__ import annotations

import numpy as np
import pytest

from mcdm.errors import McdmError
from mcdm.eval.lip_motion import clip_correlation, mouth_correlation, mouth_opening
from mcdm.eval.quality_report import TARGET_LABELS, quality_section
from mcdm.eval.quality_targets import quality_targets
from mcdm.eval.sharpness import laplacian_variance, psnr_metric, sharpness_ratio


def _face(opening: np.ndarray, iod: float = 40.0, shift: float = 0.0) -> np.ndarray:
    """(T, 68, 2) landmarks: outer eye corners iod apart, the inner lips' three pairs opening[t] * iod apart."""
    lm = np.zeros((len(opening), 68, 2))
    lm[:, 36] = (30.0 + shift, 40.0)
    lm[:, 45] = (30.0 + shift + iod, 40.0)
    for k, (up, low) in enumerate(zip((61, 62, 63), (67, 66, 65))):
        lm[:, up] = (40.0 + 5 * k + shift, 80.0)
        lm[:, low, 0] = 40.0 + 5 * k + shift
        lm[:, low, 1] = 80.0 + opening * iod
    return lm


def test_mouth_opening_is_the_inner_lip_gap_over_the_eye_corners_distance():
    opening = np.array([0.0, 0.1, 0.25])
    np.testing.assert_allclose(mouth_opening(_face(opening, iod=40.0)), opening, atol=1e-12)
    np.testing.assert_allclose(mouth_opening(_face(opening, iod=90.0, shift=7.0)), opening, atol=1e-12)  # scale-free
    lm = _face(opening)
    lm[1] = np.nan
    assert np.isnan(mouth_opening(lm)[1]) and np.isfinite(mouth_opening(lm)[[0, 2]]).all()
    with pytest.raises(McdmError):
        mouth_opening(np.zeros((3, 5, 2)))


def test_clip_correlation_matches_numpy_and_charges_lost_faces_towards_zero():
    rng = np.random.default_rng(0)
    real = np.abs(np.sin(np.arange(50) / 3.0)) * 0.3
    fake = real + rng.normal(0, 0.05, 50)
    got = clip_correlation(real, fake)
    assert got["r"] == pytest.approx(np.corrcoef(real, fake)[0, 1], abs=1e-12)
    # lost generated faces: set to the mean of the generated ones, which can only shrink |r| here
    lost = fake.copy()
    lost[::5] = np.nan
    filled = fake.copy()
    filled[::5] = np.nanmean(lost)
    charged = clip_correlation(real, lost)
    assert charged["no_face_frames"] == 10
    assert charged["r"] == pytest.approx(np.corrcoef(real, filled)[0, 1], abs=1e-12)
    assert 0 < charged["r"] < got["r"]
    # ground truth without a face: that frame's pair is left out (the data's)
    gt_lost = real.copy()
    gt_lost[3] = np.nan
    keep = np.arange(50) != 3
    assert clip_correlation(gt_lost, fake)["r"] == pytest.approx(np.corrcoef(real[keep], fake[keep])[0, 1], abs=1e-12)
    # a frozen mouth or no generated face at all: r = 0; a frozen ground truth: no r
    assert clip_correlation(real, np.full(50, 0.1))["r"] == 0.0
    assert clip_correlation(real, np.full(50, np.nan))["r"] == 0.0
    assert clip_correlation(np.full(50, 0.1), fake)["r"] is None


def test_mouth_correlation_pools_clips_with_a_bootstrap_interval():
    t = np.arange(40)
    truths = [np.abs(np.sin(t / (2.0 + k))) * 0.3 for k in range(4)]
    same = mouth_correlation([_face(o) for o in truths], [_face(o) for o in truths])[0]
    assert same["mouth_open_corr"] == pytest.approx(1.0) and same["mouth_open_corr_n"] == 4
    assert same["mouth_open_std_ratio"] == pytest.approx(1.0)
    reversed_ = mouth_correlation([_face(o) for o in truths], [_face(o[::-1]) for o in truths])[0]
    per_clip = [np.corrcoef(o, o[::-1])[0, 1] for o in truths]
    assert reversed_["mouth_open_corr"] == pytest.approx(np.mean(per_clip), abs=1e-9)
    assert reversed_["mouth_open_corr_low"] <= np.mean(per_clip) <= reversed_["mouth_open_corr_high"]
    frozen = mouth_correlation([_face(o) for o in truths], [_face(np.full(40, 0.1)) for _ in truths])[0]
    assert frozen["mouth_open_corr"] == 0.0 and frozen["mouth_open_std_ratio"] == 0.0


def _laplacian_reference(gray: np.ndarray) -> np.ndarray:
    """[[0, 1, 0], [1, -4, 1], [0, 1, 0]] with reflect-101 borders (OpenCV's default), in numpy."""
    p = np.pad(gray.astype(np.float64), 1, mode="reflect")
    return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * p[1:-1, 1:-1]


def test_laplacian_variance_matches_a_numpy_convolution():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    gray = np.rint(frames @ np.array([0.299, 0.587, 0.114])).clip(0, 255)  # BT.601 luma, as cv2
    expected = [_laplacian_reference(g).var() for g in gray]
    np.testing.assert_allclose(laplacian_variance(frames), expected, rtol=1e-3)
    flat = np.full((1, 16, 16, 3), 128, np.uint8)
    assert laplacian_variance(flat)[0] == 0.0


def test_sharpness_ratio_sees_blur_and_psnr_has_its_closed_form():
    import cv2

    rng = np.random.default_rng(2)
    real = [rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)]
    blurred = [np.stack([cv2.GaussianBlur(f, (5, 5), 1.5) for f in real[0]])]
    assert sharpness_ratio(real, real).value == pytest.approx(1.0)
    assert sharpness_ratio(real, blurred).value < 0.3
    off = [np.clip(real[0].astype(int) + 4, 0, 255).astype(np.uint8)]
    mse = np.mean((off[0].astype(float) - real[0]) ** 2)
    assert psnr_metric(real, off).value == pytest.approx(10 * np.log10(255**2 / mse))
    with pytest.raises(McdmError):
        sharpness_ratio(real, [real[0][:, :16]])


def test_quality_targets_read_the_run_and_say_what_is_met():
    model = {"identity": 0.40, "identity_gt": 0.27, "identity_no_face_frames": 0, "sync_c": 0.25,
             "mouth_open_corr": 0.3, "mouth_open_corr_low": 0.1, "mouth_open_corr_high": 0.5, "sharpness_ratio": 0.4}
    base = {"autoencoder": {"identity": 0.36}, "ground_truth": {"sync_c": 0.45}}
    t = quality_targets(model, base, 128)
    assert t["resolution"]["met"] is True and quality_targets(model, base, 64)["resolution"]["met"] is False
    assert t["identity_gap"]["value"] == pytest.approx(0.13) and t["identity_gap"]["met"] is True
    assert t["autoencoder_identity_gap"]["value"] == pytest.approx(0.09) and t["autoencoder_identity_gap"]["met"]
    assert t["no_face_frames"]["met"] is True
    assert t["sync_c_fraction"]["value"] == pytest.approx(0.25 / 0.45) and t["sync_c_fraction"]["met"] is True
    assert t["mouth_open_corr"]["met"] is False and t["mouth_open_corr"]["low"] == 0.1
    assert t["sharpness_ratio"]["met"] is False
    missing = quality_targets({}, None, 128)
    assert missing["identity_gap"]["met"] is None and missing["sync_c_fraction"]["value"] is None


def test_report_section_lists_every_target_with_its_verdict():
    model = {"identity": 0.40, "identity_gt": 0.27, "identity_no_face_frames": 3, "sync_c": 0.1,
             "mouth_open_corr": 0.3, "mouth_open_corr_low": 0.1, "mouth_open_corr_high": 0.5, "sharpness_ratio": 0.4}
    base = {"autoencoder": {"identity": 0.36, "psnr": 21.0}, "ground_truth": {"sync_c": 0.45}}
    main = {**model, "quality_targets": quality_targets(model, base, 64), "baselines": base,
            "autoencoder_psnr_heldout": 21.5}
    text = "\n".join(quality_section(main))
    assert "| 0.3 [0.1, 0.5] | >= 0.5 | no |" in text and "21.5 dB" in text and "quality_attempts.md" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "target" not in line.split("|")[1]]
    assert sum(TARGET_LABELS[k] in text for k in TARGET_LABELS) == 7 and len(rows) >= 7
    assert "Missing" in quality_section({})[2]
