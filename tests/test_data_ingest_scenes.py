"""ingest + scenes on small synthetic videos built from real portraits (no sample generator).

Also holds the synthetic-video helpers the other data-stage tests import (``synth_*``, ``tiny_params``).
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pytest

from mcdm.config import Params
from mcdm.data.ingest import ingest, list_source, safe_id
from mcdm.data.parallel import Crashed, map_videos
from mcdm.data.rejects import reason_code
from mcdm.data.scenes import detect_cuts, scenes, segments
from mcdm.media.io import probe, read_audio, read_frames

SIDE = 160  # frame side: the astronaut's face is ~80 px, HOG's window at detection scale 1.67


# --------------------------------------------------------------------------------- synthetic media
def tiny_params(**data) -> Params:
    p = Params()
    p.data.workers = 1
    p.data.min_clip_seconds = 1.0
    p.data.resolution = 32
    p.data.min_face_px = 48  # the synthetic faces are ~75 px: dlib looks at 80/48 = 1.67x
    p.data.quality.min_resolution = 48
    for k, v in data.items():
        setattr(p.data, k, v)
    return p


def portrait(side: int = SIDE) -> np.ndarray:
    """skimage's astronaut, cropped to head and shoulders (face ~ half the side)."""
    import skimage.data

    return cv2.resize(skimage.data.astronaut()[26:226, 122:322], (side, side), interpolation=cv2.INTER_AREA)


def other_scene(side: int = SIDE) -> np.ndarray:
    """A frame without a face (skimage's coffee cup)."""
    import skimage.data

    return cv2.resize(skimage.data.coffee(), (side, side), interpolation=cv2.INTER_AREA)


def moving(img: np.ndarray, n: int, amp: float = 2.0):
    """``n`` frames of ``img`` drifting by a couple of pixels (a talking head's sway)."""
    h, w = img.shape[:2]
    for i in range(n):
        m = np.float32([[1, 0, amp * np.sin(i / 6.0)], [0, 1, amp * np.cos(i / 8.0)]])
        yield cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)


def speech(seconds: float, rate: int = 16000, channels: int = 1, level: float = 0.2) -> np.ndarray:
    """(channels, N) float32: a 220 Hz voice-like tone, amplitude-modulated at 3 Hz (syllables)."""
    t = np.arange(int(round(seconds * rate))) / rate
    x = level * 0.5 * (1 + np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * 220 * t)
    return np.repeat(x[None].astype(np.float32), channels, 0)


def synth_video(path, frames, fps=25.0, audio=None, rate=16000, fmt=None, vcodec="libx264", acodec="aac") -> Path:
    """Any frame rate, sample rate, channel count and container (PyAV), unlike io.write_video."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = iter(frames)
    first = next(frames)
    with av.open(str(path), "w", format=fmt) as c:
        vs = c.add_stream(vcodec, rate=Fraction(fps).limit_denominator(1000))
        vs.height, vs.width = first.shape[:2]
        vs.pix_fmt = "yuv420p"
        if vcodec == "libx264":
            vs.options = {"preset": "ultrafast"}
        astream = None
        if audio is not None:
            layout = "mono" if audio.shape[0] == 1 else "stereo"
            astream = c.add_stream(acodec, rate=rate, layout=layout)
        for img in [first, *frames]:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        if astream is not None:
            size = astream.codec_context.frame_size or 1024
            for i in range(0, audio.shape[1], size):
                chunk = audio[:, i : i + size]
                chunk = np.pad(chunk, ((0, 0), (0, size - chunk.shape[1])))
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
                fr.sample_rate, fr.pts = rate, i
                for pkt in astream.encode(fr):
                    c.mux(pkt)
            for pkt in astream.encode(None):
                c.mux(pkt)
    return path


def synth_talking(path, seconds=2.0, fps=25.0, rate=16000, channels=1, img=None, **kw) -> Path:
    img = portrait() if img is None else img
    return synth_video(path, moving(img, int(round(seconds * fps))), fps, speech(seconds, rate, channels), rate, **kw)


# ------------------------------------------------------------------------------------------ ingest
def test_source_id_from_manifest_folders_or_stem(tmp_path):
    src = tmp_path / "src"
    synth_talking(src / "a.mp4", 1.2)
    synth_talking(src / "alice" / "talk 1.mp4", 1.2)
    synth_talking(src / "b.mp4", 1.2)
    (src / "truth").mkdir()
    (src / "truth" / "a.npz").write_bytes(b"ground truth")  # the dataset's metadata, not an input
    pd.DataFrame({"file": ["a.mp4", "gone.mp4"], "identity": ["id_007", "x"], "language": ["fr", "en"],
                  "long_term": [True, False]}).to_csv(src / "manifest.csv", index=False)
    cands, rejects = list_source(src)
    by_file = {c.file: c for c in cands}
    assert [(r["file"], reason_code(r["reason"])) for r in rejects] == [("gone.mp4", "missing")]
    assert by_file["a.mp4"].source_id == "id_007" and by_file["a.mp4"].long_term and by_file["a.mp4"].language == "fr"
    assert by_file["alice/talk 1.mp4"].source_id == "alice"
    assert by_file["b.mp4"].source_id == "b" and not by_file["b.mp4"].long_term
    assert by_file["alice/talk 1.mp4"].video_id.startswith("talk_1_")  # made safe, hash-suffixed


def test_safe_id_folds_unicode_and_spaces():
    assert safe_id("Zoë talks") == "Zoe_talks"
    assert safe_id("日本語") == "video"
    assert safe_id("ok-name_1") == "ok-name_1"


def test_ingest_table_columns_and_values(tmp_path):
    src = tmp_path / "src"
    synth_talking(src / "v.mp4", 1.6, fps=30, rate=44100, channels=2)
    videos, summary = ingest(src, tmp_path / "ingest", tiny_params())
    assert list(videos.columns[:9]) == ["video_id", "file", "path", "source_id", "duration", "fps", "width", "height", "has_audio"]
    row = videos.iloc[0]
    assert (row.fps, row.width, row.height, bool(row.has_audio)) == (30.0, SIDE, SIDE, True)
    assert abs(row.duration - 1.6) < 0.1
    assert -30 < row.audio_dbfs < -10  # the tone's level (0.1 peak mean ~ -23 dBFS), not silence
    assert pd.read_parquet(tmp_path / "ingest" / "videos.parquet").equals(videos)
    assert list(pd.read_csv(tmp_path / "ingest" / "rejects.csv").columns) == ["file", "stage", "reason"]
    assert summary.kept == 1 and summary.video_seconds == pytest.approx(row.duration)


# ------------------------------------------------------------------------------------------ scenes
def test_segments_margins_trimming_and_long_term():
    p = tiny_params(max_clip_seconds=1.5, cut_margin_frames=2)  # 37 frames at most
    segs = segments([50], 130, p)
    # scene 1: [0, 48) -> 2 pieces; scene 2: [52, 130) -> 3 pieces of <= 37 frames
    assert segs[0][0] == 0 and segs[-1][1] == 130
    assert all(b - a <= 37 for a, b in segs)
    assert [s for s in segs if s[1] <= 50][-1][1] == 48 and [s for s in segs if s[0] >= 50][0][0] == 52
    assert sum(b - a for a, b in segs) == 130 - 4
    assert segments([50], 3000, p, long_term=True) == [(0, 3000)]


def test_scene_cut_clips_are_normalised(tmp_path):
    # 2 s portrait, 2 s coffee, 2 s portrait at 30 fps with 44.1 kHz stereo: cuts at 2 s and 4 s
    src = tmp_path / "src"
    frames = [*moving(portrait(), 60), *moving(other_scene(), 60), *moving(portrait(), 60)]
    synth_video(src / "cut.mp4", frames, 30, speech(6.0, 44100, 2), 44100)
    synth_talking(src / "long.mp4", 3.0)
    pd.DataFrame({"file": ["long.mp4"], "identity": ["x"], "long_term": [True]}).to_csv(src / "manifest.csv", index=False)
    p = tiny_params(max_clip_seconds=1.6, min_clip_seconds=0.8)
    ingest(src, tmp_path / "ingest", p)
    clips, summary = scenes(tmp_path / "ingest" / "videos.parquet", tmp_path / "scenes", p)

    cuts = pd.read_parquet(tmp_path / "scenes" / "cuts.parquet")
    assert sorted(cuts.loc[cuts.file == "cut.mp4", "time"]) == pytest.approx([2.0, 4.0], abs=2 / 25)
    content = tiny_params(scene_detector="content", scene_threshold=27.0)  # PySceneDetect's other detector
    found, n = detect_cuts(str(src / "cut.mp4"), content)
    assert n == 150 and np.allclose(found, [50, 100], atol=2)
    cut_clips = clips[clips.file == "cut.mp4"]
    assert (cut_clips.n_frames <= 40).all() and len(cut_clips) == 6  # each 2 s scene -> 2 pieces <= 1.6 s
    for a, b in zip(cut_clips.end.iloc[:-1], cut_clips.start.iloc[1:]):
        assert b >= a  # no frame in two clips
    assert not any(s < 2.0 < e or s < 4.0 < e for s, e in zip(cut_clips.start, cut_clips.end))  # no clip spans a cut
    long = clips[clips.file == "long.mp4"]
    assert len(long) == 1 and long.n_frames.iloc[0] == 75 and bool(long.long_term.iloc[0])  # kept whole, untrimmed

    info = probe(cut_clips.path.iloc[0])
    assert (info.fps, info.audio_rate, info.audio_channels) == (25.0, 16000, 1)
    frames = read_frames(cut_clips.path.iloc[0])
    assert len(frames) == cut_clips.n_frames.iloc[0] and frames.shape[1:] == (SIDE, SIDE, 3)
    audio = read_audio(cut_clips.path.iloc[0])
    assert abs(len(audio) / 16000 - len(frames) / 25) < 0.07  # audio as long as the video
    assert summary.kept == len(clips) and summary.video_seconds > 8.9


def test_map_videos_dask_matches_serial_and_isolates_failures():
    # a builtin, so the worker processes import nothing of the tests; -4.0 raises in math.sqrt
    items = [0.0, 1.0, 4.0, -4.0, 16.0, 25.0]
    serial = map_videos(math.sqrt, items, workers=1)
    dask = map_videos(math.sqrt, items, workers=2, cost=abs)
    assert serial[:3] == dask[:3] == [0.0, 1.0, 2.0] and serial[4:] == dask[4:] == [4.0, 5.0]
    assert isinstance(serial[3], Crashed) and serial[3] == dask[3]
    assert dask[3].reason == "ValueError: math domain error"


def test_stage_workers_keeps_multithreaded_stages_in_process_unless_a_scheduler_is_given():
    from mcdm.data.parallel import stage_workers

    assert stage_workers(2, None, multithreaded=False) == 2  # scenes, faces: processes
    assert stage_workers(2, None, multithreaded=True) == 1  # quality, sync_filter, features: torch / cv2 threads
    assert stage_workers(4, "tcp://10.0.0.2:8786", multithreaded=True) == 4  # a cluster: always distributed


def test_cut_matching_is_one_to_one_within_tolerance():
    from mcdm.data.scoring import match_events

    assert match_events([1.0, 2.0], [1.07, 2.2], tol=0.08) == 1
    assert match_events([1.0], [0.95, 1.05], tol=0.08) == 1  # one found cut per true cut
    assert match_events([1.0, 1.1], [1.05], tol=0.08) == 1
    assert match_events([], [1.0], tol=0.08) == 0
