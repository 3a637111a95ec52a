"""Media I/O: constant-rate resampling, 16 kHz mono audio, one-line errors for unusable files."""
from __future__ import annotations

import numpy as np
import pytest

from mcdm.media import io


def _frames(n, h=48, w=64):
    # frame k carries its index in its brightness so resampling can be checked
    return [np.full((h, w, 3), 4 * (k % 60), np.uint8) for k in range(n)]


def _index(img):
    return int(round(float(img.mean()) / 4))


def test_write_probe_read_roundtrip(tmp_path):
    audio = np.sin(2 * np.pi * 440 * np.arange(32000) / 16000).astype(np.float32) * 0.5
    path = io.write_video(tmp_path / "clip ü.mp4", _frames(50), fps=25, audio=audio)
    info = io.probe(path)
    assert (info.width, info.height, info.fps, info.n_frames) == (64, 48, 25.0, 50)
    assert info.has_audio and info.audio_rate == 16000 and info.audio_channels == 1
    frames = io.read_frames(path)
    assert frames.shape == (50, 48, 64, 3)
    assert [_index(f) for f in frames[:5]] == [0, 1, 2, 3, 4]
    back = io.read_audio(path)
    assert abs(len(back) - 32000) <= 1024  # AAC pads the last frame
    # the tone survives the codec: same dominant frequency
    spec = np.abs(np.fft.rfft(back[:16000]))
    assert abs(np.argmax(spec) - 440) <= 2


@pytest.mark.parametrize("src_fps", [12.5, 30.0, 60.0])
def test_frames_resampled_to_constant_rate(tmp_path, src_fps):
    n = int(src_fps * 2)
    path = io.write_video(tmp_path / "v.mp4", _frames(n), fps=src_fps)
    out = list(io.iter_frames(path, fps=25.0))
    assert abs(len(out) - 50) <= 1
    times = np.array([t for t, _ in out])
    assert np.allclose(np.diff(times), 0.04)
    # each output tick shows the latest source frame not later than the tick
    for t, img in out:
        assert _index(img) == min(int(np.floor(t * src_fps + 1e-6)), n - 1) % 60


def test_window_read(tmp_path):
    path = io.write_video(tmp_path / "v.mp4", _frames(50), fps=25)
    clip = io.read_frames(path, fps=25, start=0.4, end=1.2)
    assert len(clip) == 20 and _index(clip[0]) == 10


def test_audio_resampled_to_16k_mono(tmp_path):
    import soundfile as sf

    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 300 * t)], 1).astype(np.float32)
    sf.write(tmp_path / "a.wav", stereo, 44100)
    audio = io.read_audio(tmp_path / "a.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(len(audio) - 16000) <= 2


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "cannot open media"), (b"this is not a video at all" * 10, "cannot open media")],
)
def test_unusable_files_raise_one_line(tmp_path, content, reason):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    with pytest.raises(io.MediaError) as err:
        io.probe(bad)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_no_audio_track_is_a_media_error(tmp_path):
    path = io.write_video(tmp_path / "silent.mp4", _frames(10), fps=25)
    assert not io.probe(path).has_audio
    with pytest.raises(io.MediaError, match="no audio track"):
        io.read_audio(path)


def test_truncated_file(tmp_path):
    path = io.write_video(tmp_path / "v.mp4", _frames(50), fps=25, audio=np.zeros(32000, np.float32))
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(io.MediaError):
        io.read_frames(cut)


def test_the_same_frames_encode_to_the_same_bytes(tmp_path):
    """Data stages re-run anywhere (in this process, on Dask workers) must write the same files:
    libx264's macroblock tree made 2-3 different streams of these frames in 10 encodes."""
    from test_data_ingest_scenes import moving, portrait

    frames = np.stack(list(moving(portrait(), 40)))  # 160 px, a talking head's sway
    audio = np.zeros(40 * 640, np.float32)
    written = {io.write_video(tmp_path / "clip.mp4", iter(frames), fps=25.0, audio=audio).read_bytes()
               for _ in range(10)}
    assert len(written) == 1
