"""faces + quality: crops, landmarks, one-face rules, and the classical quality measures.

Maths is pinned against independent references: the Laplacian against scipy.ndimage, luma against
its BT.601 formula, blockiness against real JPEG compression (OpenCV's encoder), landmarks against
dlib run directly on the source frame.
"""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from test_data_ingest_scenes import moving, other_scene, portrait, speech, synth_video, tiny_params

from mcdm.data.faces import faces
from mcdm.data.quality import blockiness, failures, luma, quality, sharpness
from mcdm.data.rejects import reason_clip, reason_code
from mcdm.errors import McdmError
from mcdm.face.dlib import DlibFace, Face
from mcdm.face.scrfd import ScrfdDetector, decode_scrfd
from mcdm.face.tracks import Sample, TrackSettings, classify, crop_square, face_runs, to_crop_coords
from mcdm.media.io import read_frames

FPS = 25


def _clip_row(path, clip_id, n):
    return {"clip_id": clip_id, "video_id": clip_id, "source_id": clip_id, "file": f"{clip_id}.mp4", "start": 0.0,
            "end": n / FPS, "n_frames": n, "path": str(path), "long_term": False, "language": "en"}


@pytest.fixture(scope="module")
def stage_outputs(tmp_path_factory):
    """Scene-clip-like inputs (25 fps, 16 kHz) straight into faces, then quality."""
    d = tmp_path_factory.mktemp("faces")
    face = portrait()
    two = np.concatenate([face, face[:, ::-1]], axis=1)  # two people side by side
    blur = cv2.GaussianBlur(face, (0, 0), 2.5)
    dark = (face * 0.2).astype(np.uint8)  # face luma ~33 < data.quality.min_brightness 40
    videos = {
        "clean": [*moving(face, 50)],
        "two": [*moving(two, 30)],
        "gap": [*moving(face, 30), *moving(other_scene(), 30), *moving(face, 30)],  # face, no face, face
        "blurred": [*moving(blur, 30)],
        "dark": [*moving(dark, 30)],
    }
    rows = []
    for name, frames in videos.items():
        path = synth_video(d / "in" / f"{name}.mp4", frames, FPS, speech(len(frames) / FPS), 16000)
        rows.append(_clip_row(path, name, len(frames)))
    pd.DataFrame(rows).to_parquet(d / "clips.parquet")
    p = tiny_params(min_clip_seconds=0.8, resolution=32)
    table, _ = faces(d / "clips.parquet", d / "faces", p)
    kept, _ = quality(d / "faces" / "faces.parquet", d / "quality", p)
    return d, p, table, kept


# --------------------------------------------------------------------------------------- faces
def test_crop_landmarks_and_boxes_of_a_clean_clip(stage_outputs):
    d, p, table, _ = stage_outputs
    row = table.set_index("clip_id").loc["clean"]  # kept whole: keeps its id
    assert row.n_frames == 50 and row.detect_rate == 1.0 and 70 < row.face_px < 95
    crop = read_frames(row.crop_path)
    assert crop.shape == (50, 32, 32, 3)
    z = np.load(row.landmarks_path)
    assert z["landmarks"].shape == (50, 68, 2) and z["landmarks"].dtype == np.float32
    assert z["boxes"].shape == (50, 4) and z["crop_boxes"].shape == (50, 4)
    assert z["detected"].dtype == bool and np.flatnonzero(z["detected"]).tolist() == [*range(0, 50, 5), 49]
    sides = z["crop_boxes"][:, 2] - z["crop_boxes"][:, 0]
    assert np.ptp(sides) == 0 and sides[0] == pytest.approx(p.data.crop_scale * row.face_px, abs=2)
    assert (z["landmarks"] > 0).all() and (z["landmarks"] < 32).all()  # the whole face inside the crop
    # back in source pixels, frame 0's landmarks match dlib run on the source frame with its detection
    src = read_frames(d / "in" / "clean.mp4", max_frames=1)[0]
    dlib = DlibFace()
    big = cv2.resize(src, None, fx=80 / 48, fy=80 / 48)
    box = tuple(v * 48 / 80 for v in dlib.detect(big)[0].box)
    ref = dlib.landmarks(src, box)
    back = z["landmarks"][0] * sides[0] / 32 + z["crop_boxes"][0, :2]
    assert np.abs(back - ref).mean() < 2.0
    # the mouth sits below the eyes, in the lower half of the crop
    lm = z["landmarks"][0]
    assert lm[48:68, 1].mean() > 16 > lm[36:48, 1].mean()


def test_two_faces_rejected_and_a_faceless_stretch_splits_the_clip(stage_outputs):
    d, _, table, _ = stage_outputs
    rejects = pd.read_csv(d / "faces" / "rejects.csv")
    codes = {(reason_clip(r), reason_code(r)) for r in rejects.reason}
    assert ("two", "multiple_faces") in codes and "two" not in set(table.video_id)
    gap = table[table.video_id == "gap"].sort_values("start")
    assert list(gap.clip_id) == ["gap_f0", "gap_f1"]
    # the faceless stretch (frames 30-59, 1.2-2.4 s) is in no kept clip; the rest is mostly kept
    assert (gap.end.iloc[0] <= 1.2) and (gap.start.iloc[1] >= 2.4)
    assert gap.n_frames.sum() >= 50
    assert ("gap", "no_face") in codes


def _s(frame, status, x=50.0, side=40.0):
    box = None if status == "none" else np.array([x, 50, x + side, 50 + side], np.float32)
    return Sample(frame, status, box, {"none": 0, "one": 1, "multi": 2, "partial": 1}[status])


def test_face_runs_tolerate_short_gaps_and_split_at_long_gaps_and_jumps():
    p = TrackSettings.from_data(tiny_params(max_face_gap_seconds=0.5, max_face_jump=0.5).data)  # 12.5 frames = 2 missed samples at k=5
    ok = [_s(f, "none" if f == 20 else "one") for f in range(0, 100, 5)]
    runs, dropped = face_runs(ok, 100, p)
    assert len(runs) == 1 and len(runs[0]) == 20 and dropped == []
    long_gap = [_s(f, "none" if 30 <= f < 60 else "one") for f in range(0, 100, 5)]
    runs, dropped = face_runs(long_gap, 100, p)
    assert [(r[0].frame, r[-1].frame) for r in runs] == [(0, 25), (60, 95)]
    assert dropped == [(26, 60, "no_face")]
    jump = [_s(f, "one", x=50.0 if f < 50 else 120.0) for f in range(0, 100, 5)]
    runs, dropped = face_runs(jump, 100, p)
    assert len(runs) == 2 and dropped == [(46, 50, "face_jump")]
    lead = [_s(f, "multi" if f < 20 else "one") for f in range(0, 100, 5)]
    runs, dropped = face_runs(lead, 100, p)
    assert dropped == [(0, 20, "multiple_faces")] and runs[0][0].frame == 20


def test_a_face_leaving_the_frame_is_partial_and_two_faces_are_multi():
    inside, edge = Face((10, 10, 60, 60), 1.0), Face((120, 10, 190, 80), 0.5)
    assert classify([inside], 160, 160).status == "one"
    assert classify([edge], 160, 160).status == "partial"  # 30 px past the right edge
    assert classify([inside, edge], 160, 160).status == "multi" and classify([], 160, 160).status == "none"


def test_crop_square_repeats_edges_and_crop_coords_are_closed_form():
    img = np.arange(100, dtype=np.uint8).reshape(10, 10, 1).repeat(3, 2)
    out = crop_square(img, np.array([-2, -2, 8, 8]), 10)
    assert out.shape == (10, 10, 3) and (out[:2, :2] == img[0, 0]).all() and (out[2:, 2:] == img[:8, :8]).all()
    pts = np.array([[30.0, 40.0], [130.0, 140.0]])
    np.testing.assert_allclose(to_crop_coords(pts, np.array([30.0, 40.0, 130.0, 140.0]), 64), [[0, 0], [64, 64]])


def test_scrfd_heads_decode_to_boxes_and_missing_weights_fail_in_one_line():
    outs = []
    for s in (8, 16, 32):
        n = (640 // s) ** 2 * 2
        score, dist = np.zeros((n, 1), np.float32), np.zeros((n, 4), np.float32)
        if s == 16:
            i = (10 * 40 + 20) * 2  # row 10, column 20, first anchor: point (320, 160)
            score[i], dist[i] = 0.9, [1, 2, 3, 4]
        outs += [score, dist, np.zeros((n, 10), np.float32)]
    boxes, scores = decode_scrfd(outs[::-1], 640, 0.5)  # head order does not matter
    np.testing.assert_allclose(boxes, [[320 - 16, 160 - 32, 320 + 48, 160 + 64]])
    np.testing.assert_allclose(scores, [0.9])
    with pytest.raises(McdmError, match="data.scrfd_path"):
        ScrfdDetector("/nonexistent/scrfd.onnx")


# ------------------------------------------------------------------------------------- quality
def test_sharpness_is_the_laplacian_variance():
    rng = np.random.default_rng(0)
    g = ndimage.gaussian_filter(rng.uniform(0, 255, (64, 64)), 1.0)
    assert sharpness(g) == pytest.approx(ndimage.laplace(g, mode="mirror").var(), rel=1e-9)
    assert sharpness(ndimage.gaussian_filter(g, 2.0)) < 0.2 * sharpness(g)


def test_luma_is_bt601():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    np.testing.assert_allclose(luma(rgb)[0], [0.299 * 255, 0.587 * 255, 0.114 * 255, 0.299 * 10 + 0.587 * 20 + 0.114 * 30])


def test_blockiness_grows_with_jpeg_compression_on_the_frame_grid():
    rng = np.random.default_rng(1)
    img = ndimage.gaussian_filter(rng.uniform(0, 255, (128, 128)), 2.0)
    img = (img - img.min()) / np.ptp(img) * 255

    def jpeg(q):
        ok, buf = cv2.imencode(".jpg", img.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, q])
        return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float64)

    clean, heavy = blockiness(img), blockiness(jpeg(5))
    assert 0.8 < clean < 1.2 and heavy > 1.6 > blockiness(jpeg(95))
    # a cut-out keeps the frame's grid when told where it sits, and loses it when not
    cut = jpeg(5)[5:, 3:]
    assert blockiness(cut, x0=3, y0=5) == pytest.approx(heavy, rel=0.05)
    assert blockiness(cut) < 0.8 * heavy


def test_failures_name_every_threshold_in_order():
    p = tiny_params()
    clip = {"face_px": 30.0}
    m = {"sharpness": 1.0, "brightness": 250.0, "blockiness": 3.0, "iqa_score": float("nan")}
    assert [c for c, _ in failures(clip, m, p)] == ["low_resolution", "too_bright", "blurry", "blocky"]
    assert failures({"face_px": 200.0}, {"sharpness": 500.0, "brightness": 120.0, "blockiness": 1.0, "iqa_score": 0}, p) == []


def test_quality_keeps_sharp_and_rejects_blurred_and_dark(stage_outputs):
    d, _, _, kept = stage_outputs
    rejects = pd.read_csv(d / "quality" / "rejects.csv")
    codes = {reason_clip(r).split("_f")[0]: reason_code(r) for r in rejects.reason}
    assert codes == {"blurred": "blurry", "dark": "too_dark"}  # exposure named before sharpness
    assert {"clean", "gap_f0", "gap_f1"} <= set(kept.clip_id)
    assert (kept.quality_backend == "classical").all()
    assert {"sharpness", "brightness", "blockiness"} <= set(kept.columns)
    scores = pd.read_parquet(d / "quality" / "scores.parquet").set_index("clip_id")
    blurred = scores.loc[scores.index.str.startswith("blurred"), "sharpness"]
    assert (blurred < 0.3 * scores.loc["clean", "sharpness"]).all()


def test_hyperiqa_backend_loads_a_local_torchscript_file_and_is_labelled(stage_outputs, tmp_path):
    torch = pytest.importorskip("torch")

    class ConstantIqa(torch.nn.Module):  # stands in for a HyperIQA export: (N,3,224,224) -> (N,)
        def forward(self, x):
            return x.mean(dim=(1, 2, 3)) * 0 + 50.0

    path = tmp_path / "hyperiqa.pt"
    torch.jit.save(torch.jit.script(ConstantIqa()), str(path))
    d, p, _, _ = stage_outputs
    p = p.model_copy(deep=True)
    p.data.quality.backend, p.data.quality.hyperiqa_path, p.data.quality.min_iqa_score = "hyperiqa", str(path), 40.0
    kept, _ = quality(d / "faces" / "faces.parquet", tmp_path / "q", p)
    assert (kept.quality_backend == "hyperiqa").all() and (kept.iqa_score == 50.0).all()
    p.data.quality.min_iqa_score = 60.0
    with pytest.raises(McdmError, match="quality: nothing survived"):
        quality(d / "faces" / "faces.parquet", tmp_path / "q2", p)
    assert pd.read_csv(tmp_path / "q2" / "rejects.csv").reason.str.contains("low_iqa|too_dark|blurry").all()
    p.data.quality.hyperiqa_path = "/nonexistent/hyperiqa.pt"
    with pytest.raises(McdmError, match="data.quality.hyperiqa_path"):
        quality(d / "faces" / "faces.parquet", tmp_path / "q3", p)
