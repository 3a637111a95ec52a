"""Bad input through ingest -> scenes -> faces: every file kept or rejected with its reason, never lost.

Odd frame rates (30, 60, 12.5 fps), odd sample rates (8, 44.1, 48 kHz, stereo), mkv / webm, a
portrait 1080x1920 video, names with spaces and unicode are KEPT and normalised; corrupt, truncated,
text, audio-less, silent files and symlinks leaving the folder are REJECTED with a reason; an empty
folder and zero survivors stop with a one-line error naming the stage and the reject counts.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import pandas as pd
import pytest
from test_data_ingest_scenes import moving, other_scene, portrait, speech, synth_talking, synth_video, tiny_params

from mcdm.cli import main
from mcdm.data.faces import faces
from mcdm.data.ingest import ingest
from mcdm.data.rejects import reason_code
from mcdm.data.scenes import scenes
from mcdm.errors import McdmError
from mcdm.media.io import probe, read_audio

GOOD = {
    "odd 30fps stereo 44k ü.mp4": dict(fps=30, rate=44100, channels=2),
    "f60 8k.mkv": dict(fps=60, rate=8000, fmt="matroska"),
    "f12.5.webm": dict(fps=12.5, rate=48000, fmt="webm", vcodec="libvpx", acodec="libopus"),
}
EXPECTED_REJECTS = {
    "notes.txt": "not_video",
    "fake.mp4": "unreadable",
    "truncated.mp4": "unreadable",
    "truncated.mkv": "truncated",
    "no_audio.mp4": "no_audio",
    "silent.mp4": "silent_audio",
    "outside link.mp4": "symlink_outside",
    "inside_link.mp4": "duplicate",
    "broken_link.mp4": "broken_symlink",
    "too_short.mp4": "too_short",
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("raw")
    for name, kw in GOOD.items():
        synth_talking(src / name, 1.6, **kw)
    # portrait 1080x1920: a large face in a tall frame (streamed, never loaded whole)
    tall = np.zeros((1920, 1080, 3), np.uint8)
    tall[420:1500] = cv2.resize(portrait(), (1080, 1080))
    synth_video(src / "portrait 1080x1920.mp4", (tall for _ in range(20)), 25, speech(0.8), 16000)
    (src / "notes.txt").write_text("not a video")
    (src / "fake.mp4").write_bytes(os.urandom(2048))
    whole = synth_talking(src / "mkvsrc.mkv.tmp", 1.6, fmt="matroska").read_bytes()
    (src / "mkvsrc.mkv.tmp").unlink()
    (src / "truncated.mkv").write_bytes(whole[: int(len(whole) * 0.55)])
    mp4 = (src / "odd 30fps stereo 44k ü.mp4").read_bytes()
    (src / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])  # index (moov) at the end is lost
    synth_video(src / "no_audio.mp4", moving(portrait(), 40), 25, None)
    synth_video(src / "silent.mp4", moving(portrait(), 40), 25, np.zeros((1, 32000), np.float32), 16000)
    synth_talking(src / "too_short.mp4", 0.36)
    outside = tmp_path_factory.mktemp("elsewhere")
    synth_talking(outside / "secret.mp4", 1.2)
    os.symlink(outside / "secret.mp4", src / "outside link.mp4")
    os.symlink("f60 8k.mkv", src / "inside_link.mp4")
    os.symlink(src / "missing.mp4", src / "broken_link.mp4")
    return src


@pytest.fixture(scope="module")
def pipeline(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    p = tiny_params(min_clip_seconds=0.6)
    videos, _ = ingest(source, out / "ingest", p)
    clips, _ = scenes(out / "ingest" / "videos.parquet", out / "scenes", p)
    crops, _ = faces(out / "scenes" / "clips.parquet", out / "faces", p)
    return out, videos, clips, crops


def test_every_input_file_is_kept_or_rejected_with_its_reason(source, pipeline):
    out, videos, _, _ = pipeline
    rejects = pd.read_csv(out / "ingest" / "rejects.csv")
    got = {f: reason_code(r) for f, r in zip(rejects.file, rejects.reason)}
    assert got == EXPECTED_REJECTS
    all_files = {str(p.relative_to(source)) for p in source.rglob("*") if p.is_file() or p.is_symlink()}
    assert set(videos.file) | set(rejects.file) == all_files and not set(videos.file) & set(rejects.file)
    assert set(videos.file) == {*GOOD, "portrait 1080x1920.mp4"}


def test_odd_inputs_are_normalised_through_faces(pipeline):
    out, videos, clips, crops = pipeline
    assert set(clips.file) == set(videos.file) == set(crops.file)  # every odd input survives to crops
    for path in clips.path:
        info = probe(path)
        assert (info.fps, info.audio_rate, info.audio_channels) == (25.0, 16000, 1)
    assert clips.set_index("file").loc["f12.5.webm", "n_frames"] == pytest.approx(40, abs=2)  # 1.6 s at 25 fps
    tall = clips.set_index("file").loc["portrait 1080x1920.mp4"]
    assert (tall.width, tall.height) == (1080, 1920)
    for path in crops.crop_path:
        info = probe(path)
        assert (info.width, info.height, info.fps, info.audio_rate) == (32, 32, 25.0, 16000)
        assert len(read_audio(path)) >= 0.75 * 16000
    assert crops.set_index("file").loc["portrait 1080x1920.mp4", "face_px"] > 300


def test_empty_folder_stops_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(McdmError, match="ingest: source folder .* holds no files"):
        ingest(tmp_path / "empty", tmp_path / "out", tiny_params())


def test_zero_survivors_exit_non_zero_naming_stage_and_counts(tmp_path, capsys):
    src = tmp_path / "raw"
    synth_video(src / "cup.mp4", moving(other_scene(), 40), 25, speech(1.6), 16000)  # no face at all
    (tmp_path / "params.yaml").write_text("data:\n  workers: 1\n  min_clip_seconds: 1.0\n  resolution: 32\n")
    base = ["--params", str(tmp_path / "params.yaml")]
    assert main([*base, "ingest", "--source", str(src), "--out", str(tmp_path / "ingest")]) == 0
    assert main([*base, "scenes", "--videos", str(tmp_path / "ingest" / "videos.parquet"), "--out", str(tmp_path / "scenes")]) == 0
    rc = main([*base, "faces", "--clips", str(tmp_path / "scenes" / "clips.parquet"), "--out", str(tmp_path / "faces")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "mcdm faces: error: faces: nothing survived (no_face 1)" in err
    assert pd.read_csv(tmp_path / "faces" / "rejects.csv").reason.str.startswith("no_face").all()
    assert not (tmp_path / "faces" / "faces.parquet").exists()


def test_stage_run_out_of_order_names_the_missing_stage(tmp_path, capsys):
    rc = main(["--params", "/nonexistent/params.yaml", "scenes", "--videos", "x.parquet", "--out", str(tmp_path)])
    assert rc == 2  # params are validated first
    p = tmp_path / "params.yaml"
    p.write_text("{}\n")
    rc = main(["--params", str(p), "scenes", "--videos", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "s")])
    assert rc == 2 and "run `dvc repro ingest` first" in capsys.readouterr().err


def test_data_report_merges_rejects_draws_the_sheet_and_scores_planted_defects(source, pipeline, tmp_path):
    from mcdm.data.scoring import data_report

    out, videos, clips, crops = pipeline
    kinds = {**{f: "clean" for f in videos.file}, "fake.mp4": "corrupt", "truncated.mp4": "corrupt",
             "truncated.mkv": "corrupt", "no_audio.mp4": "no_audio"}
    manifest = pd.DataFrame({"file": list(kinds), "kind": list(kinds.values()), "duration": 1.6, "fps": 25.0,
                             "scene_cuts": "", "no_face_start": None, "no_face_end": None, "long_term": False})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    report = data_report([out / "ingest", out / "scenes", out / "faces"], out / "faces" / "faces.parquet",
                         tmp_path / "reports", tiny_params(), source=source, manifest=tmp_path / "manifest.csv")
    merged = pd.read_csv(tmp_path / "reports" / "data_rejects.csv")
    assert len(merged) == len(EXPECTED_REJECTS) and set(merged.code) >= {"ingest/unreadable", "ingest/no_audio"}
    png = tmp_path / "reports" / "data_contact_sheet.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    s = report["scores"]
    assert s["corrupt"]["recall"] == 1.0 and s["corrupt"]["caught"] == 3
    assert s["no_audio"]["recall"] == 1.0 and s["clean_kept"]["rate"] == 1.0
    assert report["stages"]["ingest"]["kept"] == len(videos)
    assert (tmp_path / "reports" / "data_pipeline.json").exists()
