"""talkingface-wild-mini (``mcdm sample-data``): the sample set is real enough for every later stage.

One small set (12 videos + 1 long, durations scaled by 0.4) is generated once for the module; the
tests check it with independent tools: PyAV decoding, dlib's HOG detector / 68 landmarks / face
descriptor, a numpy RMS envelope of the decoded audio, and plain image statistics.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from mcdm.config import Params, SampleParams, dump_params
from mcdm.data.sample.defects import CLEAN_KINDS, DEFECT_KINDS, KINDS
from mcdm.data.sample.generator import (
    MANIFEST_COLUMNS,
    TRUTH_KEYS,
    defect_counts,
    generate_sample,
    plan_videos,
    read_manifest,
)
from mcdm.data.sample.speech import LANGUAGES, SENTENCES, ESpeak
from mcdm.errors import McdmError
from mcdm.face.dlib import DlibFace, descriptor_distance
from mcdm.media.io import MediaError, probe, read_audio, read_frames

SMALL = SampleParams(n_videos=12, n_long=1, long_seconds=20.0, time_scale=0.4, seed=3)
FPS = 25


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "sample"
    generate_sample(out, SMALL, workers=2)
    return out


@pytest.fixture(scope="module")
def manifest(sample):
    return read_manifest(sample)


@pytest.fixture(scope="module")
def face():
    return DlibFace()


def rms_envelope(audio: np.ndarray, n_frames: int, rate: int = 16000) -> np.ndarray:
    """Independent reference: RMS per video frame by reshaping (no shared code with the generator)."""
    hop = rate // FPS
    audio = np.pad(audio, (0, max(0, n_frames * hop - len(audio))))[: n_frames * hop]
    return np.sqrt((audio.reshape(n_frames, hop).astype(np.float64) ** 2).mean(1))


def laplacian_var(img: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


# ---------------------------------------------------------------------------------------------
# plan and manifest


def test_default_plan_is_mostly_clean_and_covers_identities_and_languages():
    sample = Params().sample
    specs = plan_videos(sample)
    kinds = [s.kind for s in specs]
    assert len(specs) == sample.n_videos + 2 and kinds.count("long_term") == 2
    assert kinds.count("clean") / sample.n_videos >= 0.6
    assert all(kinds.count(k) >= 1 for k in DEFECT_KINDS)
    clean = [s for s in specs if s.kind == "clean"]
    assert {s.identities[0] for s in clean} == {s.identities[0] for s in specs}
    assert len({s.identities[0] for s in clean}) >= 8
    assert {s.language for s in clean} == set(LANGUAGES)
    per_identity = np.unique([s.identities[0] for s in clean], return_counts=True)[1]
    assert per_identity.max() >= 4  # some identities carry many videos (identity-level splits)
    assert all(6.0 <= s.duration <= 15.0 for s in clean)
    assert [s.seed for s in plan_videos(Params().sample)] == [s.seed for s in specs]


def test_defect_counts_keep_a_clean_share():
    for n in (2, 5, 12, 40, 100):
        counts = defect_counts(n)
        assert n - sum(counts.values()) >= max(1, int(np.ceil(0.2 * n)))
    assert all(v >= 1 for v in defect_counts(12).values())


def test_manifest_contract(sample, manifest):
    assert list(manifest.columns) == MANIFEST_COLUMNS
    files = sorted(p.name for p in sample.glob("*.mp4"))
    assert sorted(manifest["file"]) == files and manifest["video_id"].is_unique
    assert set(manifest["kind"]) == set(KINDS)
    for r in manifest.itertuples():
        assert r.defects == ("" if r.kind in CLEAN_KINDS else r.kind)
        assert r.long_term == (r.kind == "long_term")
        assert r.fps == FPS and r.n_frames == round(r.duration * FPS)
        assert len(r.identity.split(";")) == (2 if r.kind in ("scene_cut", "two_faces") else 1)
        assert bool(r.scene_cuts) == (r.kind == "scene_cut")
        assert np.isnan(r.no_face_start) == (r.kind != "no_face_segment")
        assert (r.audio_shift_s != 0) == (r.kind == "av_shift")
        assert r.text and r.language in LANGUAGES
    assert set(manifest["language"]) == set(LANGUAGES)
    # a clean portrait per identity
    identities = {i for v in manifest["identity"] for i in v.split(";")}
    assert identities <= {p.stem for p in (sample / "identities").glob("*.png")}


def test_truth_series(sample, manifest):
    yaw_max, smiles = 0.0, 0
    for r in manifest.itertuples():
        truth = np.load(sample / "truth" / f"{r.video_id}.npz")
        assert set(truth.files) == set(TRUTH_KEYS)
        t = r.n_frames
        assert truth["mouth_open"].shape == (t,) and truth["blink"].shape == (t,)
        assert truth["head_pose"].shape == (t, 5) and truth["expression"].shape == (t,)
        assert truth["envelope"].shape == (t,)
        for k in ("mouth_open", "blink", "envelope"):
            assert 0.0 <= truth[k].min() and truth[k].max() <= 1.0
        assert set(np.unique(truth["expression"])) <= {0, 1, 2}
        assert truth["blink"].max() == 1.0 or t < 150  # blinks every 2-6 s
        assert np.abs(truth["head_pose"][:, :3]).max() < 15
        yaw_max = max(yaw_max, np.abs(truth["head_pose"][:, 0]).max())
        smiles += int((truth["expression"] == 1).sum())
    assert yaw_max > 3 and smiles > 0


# ---------------------------------------------------------------------------------------------
# media


def test_every_mp4_decodes_with_the_declared_streams(sample, manifest):
    for r in manifest.itertuples():
        path = sample / r.file
        if r.kind == "corrupt":
            with pytest.raises((MediaError, av.error.FFmpegError)):
                probe(path)
                read_frames(path)
            continue
        with av.open(str(path)) as c:
            v = c.streams.video[0]
            assert v.codec_context.name == "h264" and float(v.average_rate) == FPS
            assert (v.codec_context.width, v.codec_context.height) == (
                (2 * SMALL.size, SMALL.size) if r.kind == "two_faces" else (SMALL.size, SMALL.size))
            if r.kind == "no_audio":
                assert not c.streams.audio
            else:
                assert c.streams.audio[0].codec_context.name == "aac"
            n = sum(1 for _ in c.decode(v))
        assert n == r.n_frames
        if r.kind != "no_audio":
            audio = read_audio(path)
            assert abs(len(audio) / 16000 - r.duration) < 0.1 and np.abs(audio).max() > 0.05


def test_clean_videos_have_exactly_one_detected_face(sample, manifest, face):
    one = total = 0
    for r in manifest[manifest["kind"].isin(CLEAN_KINDS)].itertuples():
        for img in read_frames(sample / r.file)[::3]:
            one += len(face.detect(img)) == 1
            total += 1
    assert total > 100 and one / total >= 0.95


def test_mouth_follows_the_speech(sample, manifest, face):
    """Truth mouth vs the decoded audio's envelope, and the visible mouth (dlib landmarks) vs truth."""
    for r in manifest[manifest["kind"].isin(CLEAN_KINDS)].itertuples():
        truth = np.load(sample / "truth" / f"{r.video_id}.npz")
        env = rms_envelope(read_audio(sample / r.file), r.n_frames)
        assert np.corrcoef(truth["mouth_open"], np.log(env + 1e-4))[0, 1] > 0.6
    r = manifest[manifest["kind"] == "long_term"].iloc[0]
    truth = np.load(sample / "truth" / f"{r.video_id}.npz")
    frames = read_frames(sample / r.file)
    gaps = []
    for img in frames:
        lm = face.landmarks(img, face.detect(img)[0].box)
        gaps.append((lm[66, 1] - lm[62, 1]) / np.linalg.norm(lm[42:48].mean(0) - lm[36:42].mean(0)))
    assert np.corrcoef(gaps, truth["mouth_open"])[0, 1] > 0.8


# ---------------------------------------------------------------------------------------------
# planted defects


def _row(manifest, kind):
    rows = manifest[manifest["kind"] == kind]
    assert len(rows) >= 1, kind
    return rows.iloc[0]


def test_scene_cut_is_a_hard_cut_between_two_identities(sample, manifest, face):
    r = _row(manifest, "scene_cut")
    cut = int(r.scene_cuts.split(";")[0])
    frames = read_frames(sample / r.file).astype(np.float32)
    diffs = np.abs(np.diff(frames, axis=0)).mean((1, 2, 3))  # diffs[i]: frame i -> i+1
    assert diffs.argmax() == cut - 1 and diffs[cut - 1] > 5 * np.median(diffs)
    before, after = frames[cut - 3].astype(np.uint8), frames[cut + 3].astype(np.uint8)
    assert descriptor_distance(face.descriptor(before), face.descriptor(after)) > 0.35


def test_too_long_video_exceeds_the_clip_limit(manifest):
    r = _row(manifest, "too_long")
    assert r.duration > Params().data.max_clip_seconds
    assert manifest[manifest["kind"] == "long_term"]["long_term"].all()


def test_no_face_segment_has_no_face_inside_and_one_outside(sample, manifest, face):
    r = _row(manifest, "no_face_segment")
    assert r.no_face_end - r.no_face_start >= 1.5
    frames = read_frames(sample / r.file)
    t = np.arange(len(frames)) / FPS
    inside = (t >= r.no_face_start) & (t < r.no_face_end)
    far = (t < r.no_face_start - 0.4) | (t >= r.no_face_end + 0.4)
    assert all(len(face.detect(img)) == 0 for img in frames[inside][::2])
    assert np.mean([len(face.detect(img)) == 1 for img in frames[far][::3]]) >= 0.9


def test_two_faces_are_both_detected(sample, manifest, face):
    r = _row(manifest, "two_faces")
    frames = read_frames(sample / r.file)[::10]
    assert np.mean([len(face.detect(img)) == 2 for img in frames]) >= 0.9


def test_blurred_and_low_res_lose_detail(sample, manifest):
    sharp = np.median([laplacian_var(read_frames(sample / r.file, max_frames=1)[0])
                       for r in manifest[manifest["kind"] == "clean"].itertuples()])
    # measured on this set: blurred 0.100 x sharp, low_res 0.26 x (H.264 at crf 20, no macroblock tree)
    for kind, factor in (("blurred", 0.12), ("low_res", 0.35)):
        img = read_frames(sample / _row(manifest, kind).file, max_frames=1)[0]
        assert laplacian_var(img) < factor * sharp, kind


def test_av_shift_is_recovered_from_the_audio(sample, manifest):
    """The decoded audio's envelope matches the truth envelope best at the planted shift."""
    def best_lag(r):
        truth = np.load(sample / "truth" / f"{r.video_id}.npz")["envelope"]
        env = np.log(rms_envelope(read_audio(sample / r.file), r.n_frames) + 1e-4)
        lags = range(-20, 21)
        score = [np.corrcoef(env[max(0, k): len(env) + min(0, k)], truth[max(0, -k): len(truth) + min(0, -k)])[0, 1]
                 for k in lags]
        return lags[int(np.argmax(score))]

    r = _row(manifest, "av_shift")
    assert 0.3 <= abs(r.audio_shift_s) <= 0.6
    assert abs(best_lag(r) - r.audio_shift_s * FPS) <= 1
    assert abs(best_lag(_row(manifest, "clean"))) <= 1


def test_corrupt_and_no_audio(sample, manifest):
    with pytest.raises(MediaError):
        read_frames(sample / _row(manifest, "corrupt").file)
    info = probe(sample / _row(manifest, "no_audio").file)
    assert not info.has_audio
    with pytest.raises(MediaError):
        read_audio(sample / _row(manifest, "no_audio").file)


# ---------------------------------------------------------------------------------------------
# speech, identities, determinism, CLI


def test_espeak_speaks_all_ten_languages():
    engine = ESpeak.get()
    for lang in LANGUAGES:
        utt = engine.synth(SENTENCES[lang][0], lang)
        assert len(utt.audio) / 16000 > 1.0 and np.abs(utt.audio).max() > 0.05, lang
        assert len(utt.phonemes) > 10, lang


def test_identities_are_distinct_by_dlib_descriptor(face):
    """>= 95% of (same-identity pair, different-identity pair) comparisons rank the same pair closer."""
    from mcdm.data.sample.animate import FaceRig, FrameState
    from mcdm.data.sample.portraits import build_identities

    rng = np.random.default_rng(0)
    descriptors = {}
    identities = build_identities(256)
    assert len(identities) >= 8
    for name, portrait in identities.items():
        rig = FaceRig(portrait)
        states = [FrameState(mouth=rng.uniform(0, 0.8), blink=rng.choice([0.0, 0.0, 1.0]),
                             smile=rng.uniform(0, 0.8) * (i == 1), brow=rng.uniform(0, 0.8) * (i == 2),
                             yaw=rng.uniform(-10, 10), pitch=rng.uniform(-6, 6), roll=rng.uniform(-6, 6),
                             tx=rng.uniform(-8, 8), ty=rng.uniform(-6, 6)) for i in range(3)]
        descriptors[name] = [face.descriptor(rig.render(s)) for s in states]
        assert all(d is not None for d in descriptors[name]), name
    same = np.array([descriptor_distance(a, b) for v in descriptors.values() for a, b in itertools.combinations(v, 2)])
    diff = np.array([descriptor_distance(a, b) for u, v in itertools.combinations(descriptors.values(), 2)
                     for a in u for b in v])
    assert (same[:, None] < diff[None, :]).mean() >= 0.95


def test_generation_is_deterministic(sample, manifest, tmp_path):
    """Re-rendering videos in this process gives the bytes the Dask workers wrote for the same seed."""
    from mcdm.data.sample.generator import render_video, speech_request
    from mcdm.data.sample.portraits import build_identities
    from mcdm.data.sample.speech import synthesize_fresh

    specs = plan_videos(SMALL)
    assert [s.video_id for s in specs] == list(manifest["video_id"])
    speeches = synthesize_fresh([speech_request(s) for s in specs])
    portraits = build_identities(SMALL.size)
    (tmp_path / "truth").mkdir()
    picks = [s for s in specs if s.kind in ("scene_cut", "clean")][:2]
    for spec in picks:
        row = render_video(spec, speeches[spec.index], portraits, tmp_path)
        listed = manifest.iloc[spec.index]
        assert [row[k] for k in ("identity", "text", "n_frames", "scene_cuts", "seed")] == [
            listed[k] for k in ("identity", "text", "n_frames", "scene_cuts", "seed")]
        for rel in (f"{spec.video_id}.mp4", f"truth/{spec.video_id}.npz"):
            assert (tmp_path / rel).read_bytes() == (sample / rel).read_bytes(), rel
    # another seed, other videos
    assert [s.seed for s in specs] != [s.seed for s in plan_videos(SMALL.model_copy(update={"seed": 4}))]


def test_cli_writes_the_sample_set(tmp_path):
    from mcdm.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(dump_params(Params()))
    out = tmp_path / "out dir"  # a space in the path
    assert main(["--params", str(params), "sample-data", "--out", str(out), "--n-videos", "1", "--n-long", "0",
                 "--seconds", "0.3", "--seed", "5", "--workers", "1"]) == 0
    m = read_manifest(out)
    assert list(m["kind"]) == ["clean"] and (out / m["file"][0]).exists()
    assert main(["--params", str(params), "sample-data", "--out", str(out), "--seconds", "0"]) == 2


def test_refuses_to_replace_an_unrelated_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(McdmError, match="refusing"):
        generate_sample(tmp_path, SampleParams(n_videos=1, n_long=0), workers=1)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
