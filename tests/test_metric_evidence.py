"""What the fallback metrics can be trusted for (issue #19): a lost face counts against the model
(hand-computed penalties), the FVD fallback sees the direction of time and is symmetric, and the E-FID
fallback measures expression, not face shape. No dlib here: a stub stands in for the face analysis."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from mcdm.eval import metrics as M
from mcdm.eval.face_features import DlibFrameFeatures
from mcdm.eval.failures import IDENTITY_FAILURE_DISTANCE, no_face_feature, penalised_features
from mcdm.eval.frechet import frechet_from_features
from mcdm.eval.landmark_features import DynamicsVideoFeatures, clip_dynamics_parts, landmark_expression_features

# ------------------------------------------------------------------------------------------------
# failures are charged, not dropped


def test_no_face_point_and_penalised_frechet_hand_computed():
    # real {0, 1, 2}: zeta = max + (max - min) = 4; generated {0, lost, 2} -> {0, 4, 2}
    real, fake = np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [np.nan], [2.0]])
    assert no_face_feature(real) == pytest.approx([4.0])
    real_ok, charged, failed = penalised_features(real, fake)
    np.testing.assert_array_equal(charged[:, 0], [0.0, 4.0, 2.0])
    assert failed.tolist() == [False, True, False]
    # real: mean 1, var 1; generated: mean 2, var ((0-2)^2 + (4-2)^2 + 0) / 2 = 4: d^2 = 1 + (1 - 2)^2 = 2
    assert frechet_from_features(real_ok, charged) == pytest.approx(2.0, abs=1e-12)
    # dropping the lost frame instead: {0, 2}: mean 1, var 2: d^2 = (1 - sqrt 2)^2 = 0.17, a better score
    assert frechet_from_features(real, fake[[0, 2]]) == pytest.approx((1 - np.sqrt(2)) ** 2, abs=1e-12)
    # a real frame without a face is the data's: left out of the real set and counted
    result = M._frechet_result("fid", "test", np.array([[0.0], [1.0], [2.0], [np.nan]]), fake, "frames", {})
    assert result.value == pytest.approx(2.0, abs=1e-12) and result.n == 3
    assert result.details["no_face_frames_real"] == 1 and result.details["no_face_frames_fake"] == 1
    assert result.details["failure_rate"] == pytest.approx(1 / 3)
    # Wilson 95% interval of 1 failure in 3 (z = 1.959964): centre (1/3 + z^2/6) / (1 + z^2/3)
    z = 1.959963984540054
    centre = (1 / 3 + z * z / 6) / (1 + z * z / 3)
    half = z / (1 + z * z / 3) * np.sqrt((1 / 3) * (2 / 3) / 3 + z * z / 36)
    assert result.details["failure_rate_low"] == pytest.approx(centre - half)
    assert result.details["failure_rate_high"] == pytest.approx(centre + half)


def test_losing_faces_never_scores_better_and_never_becomes_null():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(60, 8)), rng.normal(size=(60, 8)) + 0.3
    values = []
    for lost in (0, 6, 12, 24, 60):  # the model loses more and more faces
        f = fake.copy()
        f[:lost] = np.nan
        values.append(M._frechet_result("fid", "test", real, f, "frames", {}).value)
    assert all(b > a for a, b in zip(values, values[1:])), values  # every lost face costs
    assert np.isfinite(values[-1])  # all faces lost: a (large) number, not null
    # dropping them would have looked better than keeping the frames (the bug this guards against)
    assert frechet_from_features(real, fake[24:]) < values[3]


def test_identity_charges_a_lost_face_and_reports_the_rate():
    curve = np.array([0.2, np.nan, 0.4, 0.2])
    s = M.identity_summary([curve], [np.array([0.1, 0.1, np.nan, 0.1])])
    assert s["identity"] == pytest.approx((0.2 + IDENTITY_FAILURE_DISTANCE + 0.4 + 0.2) / 4)
    assert s["identity_no_face_frames"] == 1 and s["identity_n"] == 4 and s["identity_failure_rate"] == 0.25
    assert s["identity_gt"] == pytest.approx(0.1) and s["identity_gt_n"] == 3  # ground truth's: left out


# ------------------------------------------------------------------------------------------------
# FVD fallback: time order, symmetry (a stub face analysis maps each frame to its landmarks)


class StubFaces:
    """``landmarks`` / ``descriptors`` of frames whose first pixels encode an index into tables."""

    def __init__(self, landmarks: np.ndarray, descriptors: np.ndarray):
        self.lm, self.desc = landmarks, descriptors

    @staticmethod
    def index(frames) -> np.ndarray:
        f = np.asarray(frames).reshape(len(frames), -1)[:, :3].astype(np.int64)
        return f[:, 0] * 65536 + f[:, 1] * 256 + f[:, 2]

    def landmarks(self, frames, desc=None):
        return self.lm[self.index(frames)]

    def descriptors(self, frames, desc=None):
        return self.desc[self.index(frames)]


def _talking_set(rng, n_clips: int, t: int, base: np.ndarray, offset: int):
    """Clips whose mouth opens in 2 frames and closes over 8 (as a plosive release does), random phase
    and amplitude, with small noise; frames carry their row index in their first 3 pixels."""
    lms, frames = [], []
    for c in range(n_clips):
        phase, amp = rng.integers(10), rng.uniform(3, 6)
        opening = np.array([amp * (1 - ((k + phase) % 10 - 2) / 8) if (k + phase) % 10 >= 2 else amp * ((k + phase) % 10) / 2
                            for k in range(t)])
        for k in range(t):
            lm = base.copy()
            lm[57:60, 1] += opening[k]
            lm[65:68, 1] += opening[k]
            lms.append(lm + rng.normal(0, 0.05, lm.shape))
            idx = offset + c * t + k
            img = np.full((8, 8, 3), 128, np.uint8)
            img.reshape(-1)[:3] = (idx // 65536, (idx // 256) % 256, idx % 256)
            frames.append(img)
    return np.stack(lms), np.stack(frames).reshape(n_clips, t, 8, 8, 3)


@pytest.fixture(scope="module")
def talking():
    base = DlibFrameFeatures().landmarks(skimage.data.astronaut())[0]
    rng = np.random.default_rng(1)
    t, n = 16, 40
    lm_a, clips_a = _talking_set(rng, n, t, base, 0)
    lm_b, clips_b = _talking_set(rng, n, t, base, n * t)
    desc = rng.normal(0, 1e-4, (2 * n * t, 128)) + 0.1
    faces = StubFaces(np.concatenate([lm_a, lm_b]), desc)
    return DynamicsVideoFeatures(faces, descriptor_every=4), list(clips_a), list(clips_b)


def test_fvd_fallback_scores_reversed_and_frozen_videos_worse_than_real(talking):
    backend, real, other = talking
    honest = M.fvd(real, other, backend).value  # the same process, other draws
    backwards = M.fvd(real, [c[::-1] for c in other], backend)
    frozen = M.fvd(real, [np.repeat(c[:1], len(c), axis=0) for c in other], backend).value
    assert backwards.value > 2 * honest and frozen > 2 * honest, (honest, backwards.value, frozen)
    # it is the time-order part that sees the reversal; the amplitude spectra cannot
    assert backwards.details["part_time_order"] > 5 * M.fvd(real, other, backend).details["part_time_order"]
    assert backwards.details["part_motion"] == pytest.approx(M.fvd(real, other, backend).details["part_motion"],
                                                              rel=1e-9)


def test_fvd_fallback_is_symmetric_and_its_parts_tile_the_vector(talking):
    backend, real, other = talking
    assert M.fvd(real, other, backend).value == pytest.approx(M.fvd(other, real, backend).value, rel=1e-9)
    parts = clip_dynamics_parts(16)
    assert parts["appearance"].start == 0 and parts["time_order"].stop == backend(real[:1]).shape[1] == 362
    assert all(a.stop == b.start for a, b in zip(list(parts.values()), list(parts.values())[1:]))


# ------------------------------------------------------------------------------------------------
# E-FID fallback: expression relative to the identity's own neutral shape


def _people():
    """Two face shapes (astronaut's landmarks, and a person with a wider mouth, lower brows and a longer
    nose), each neutral, with a closed and an open mouth."""
    a = DlibFrameFeatures().landmarks(skimage.data.astronaut())[0]
    b = a.copy()
    mouth_centre = a[48:68].mean(axis=0)
    b[48:68, 0] = mouth_centre[0] + 1.3 * (a[48:68, 0] - mouth_centre[0])  # wider lips
    b[17:27, 1] += 4  # lower brows
    b[48:68, 1] += 5  # longer face below the nose
    b[31:36, 1] += 3  # longer nose tip (not a rigid anchor row's eye point)

    def open_mouth(lm, amount):
        out = lm.copy()
        out[56:59, 1] += amount
        out[65:68, 1] += amount
        return out

    return a, b, open_mouth


def test_efid_same_expression_on_two_people_scores_zero_open_vs_closed_does_not():
    a, b, open_mouth = _people()
    rng = np.random.default_rng(4)
    amounts = rng.uniform(0, 2, 30)
    closed_a = np.stack([open_mouth(a, x) for x in amounts])
    closed_b = np.stack([open_mouth(b, x) for x in amounts])
    open_a = np.stack([open_mouth(a, x + 8) for x in amounts])
    same_expression = M.efid(closed_a, closed_b, real_neutral=a, fake_neutral=b).value
    expression = M.efid(closed_a, open_a, real_neutral=a, fake_neutral=a).value
    assert expression > 1e-3 and same_expression < 1e-3 * expression, (same_expression, expression)
    # offsets from a shared shape instead (the old fallback) carried the face shape
    shared = M.efid(closed_a, closed_b, real_neutral=a, fake_neutral=a).value
    assert shared > 0.1 * expression
    # the offsets themselves: identical for the two people (each face's shape cancels against its own neutral)
    np.testing.assert_allclose(landmark_expression_features(closed_a, a), landmark_expression_features(closed_b, b),
                               atol=1e-9)


def test_efid_fallback_needs_each_identity_neutral():
    a, _, _ = _people()
    with pytest.raises(Exception, match="neutral"):
        M.efid(np.stack([a, a]), np.stack([a, a]))
