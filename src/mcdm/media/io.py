"""Video and audio I/O on PyAV (bundled FFmpeg) and soundfile.

One place reads and writes media for every stage. Frames are streamed (never a whole long video in
memory unless the caller asks for it), audio is resampled to 16 kHz mono on read, and every failure
to open or decode a file becomes a ``MediaError`` with a one-line reason that stages record as a
reject instead of a traceback.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from mcdm.media.files import atomic_path

AUDIO_RATE = 16_000


class MediaError(RuntimeError):
    """A media file that cannot be used; ``str(err)`` is a one-line reason suitable for rejects."""


@dataclass(frozen=True)
class MediaInfo:
    path: str
    width: int
    height: int
    fps: float
    duration: float  # seconds (video stream, else container)
    n_frames: int  # estimated from duration * fps when the container does not say
    has_audio: bool
    audio_rate: int | None
    audio_channels: int | None


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # FFmpeg would block forever on a FIFO's open
            raise MediaError("not a regular file (a FIFO, socket or device): not opened")
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:  # corrupt, not a media file
        raise MediaError(f"cannot open media: {type(err).__name__}: {str(err).splitlines()[0][:160]}") from err


def probe(path: str | os.PathLike) -> MediaInfo:
    """Stream properties without decoding; raises MediaError when there is no video stream."""
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        v = container.streams.video[0]
        rate = v.average_rate or v.guessed_rate or v.base_rate
        fps = float(rate) if rate else 0.0
        if v.duration is not None and v.time_base is not None:
            duration = float(v.duration * v.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        n_frames = v.frames or int(round(duration * fps))
        a = container.streams.audio[0] if container.streams.audio else None
        return MediaInfo(
            path=str(path),
            width=v.codec_context.width,
            height=v.codec_context.height,
            fps=fps,
            duration=duration,
            n_frames=n_frames,
            has_audio=a is not None,
            audio_rate=a.codec_context.sample_rate if a is not None else None,
            audio_channels=a.codec_context.channels if a is not None else None,
        )


def iter_frames(
    path: str | os.PathLike,
    fps: float | None = None,
    start: float = 0.0,
    end: float | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield ``(time_s, rgb uint8 HxWx3)`` frames, optionally resampled to a constant ``fps``.

    Resampling picks, for each output tick ``start + k / fps``, the latest decoded frame whose
    timestamp is <= the tick (frame duplication / dropping, as ffmpeg's fps filter does), so odd or
    variable input rates come out at exactly ``fps``. Frames are decoded one at a time.
    """
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if start > 0:
            container.seek(int(max(start - 1.0, 0) / stream.time_base), stream=stream, backward=True)
        src_fps = float(stream.average_rate or stream.guessed_rate or 25)
        prev: np.ndarray | None = None
        last_t = 0.0
        k = 0
        eps = 1e-6
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                if fps is None:
                    if t + eps < start:
                        continue
                    if end is not None and t >= end - eps:
                        return
                    yield t, frame.to_ndarray(format="rgb24")
                    continue
                img = None
                while True:  # emit every tick that falls before this frame
                    tick = start + k / fps
                    if end is not None and tick >= end - eps:
                        return
                    if tick >= t - eps:
                        break
                    if prev is None:  # leading gap: the first frame stands in
                        img = img if img is not None else frame.to_ndarray(format="rgb24")
                        yield tick, img
                    else:
                        yield tick, prev
                    k += 1
                prev = img if img is not None else frame.to_ndarray(format="rgb24")
                last_t = t
            if fps is not None and prev is not None:  # ticks covered by the last frame
                while True:
                    tick = start + k / fps
                    if tick >= last_t + 1.0 / src_fps - eps or (end is not None and tick >= end - eps):
                        return
                    yield tick, prev
                    k += 1
        except av.error.FFmpegError as err:
            raise MediaError(f"decode error at frame {k}: {str(err).splitlines()[0][:160]}") from err


def read_frames(path: str | os.PathLike, fps: float | None = None, start: float = 0.0,
                end: float | None = None, max_frames: int | None = None) -> np.ndarray:
    """All frames in ``[start, end)`` as ``(T, H, W, 3)`` uint8; for short clips only."""
    out = []
    for _, img in iter_frames(path, fps=fps, start=start, end=end):
        out.append(img)
        if max_frames is not None and len(out) >= max_frames:
            break
    if not out:
        raise MediaError("no decodable video frames")
    return np.stack(out)


def read_audio(path: str | os.PathLike, rate: int = AUDIO_RATE, start: float = 0.0,
               end: float | None = None) -> np.ndarray:
    """Audio as float32 mono at ``rate`` Hz (resampled by FFmpeg's swresample); MediaError if none.

    Works on video containers and on plain audio files (wav, flac, mp3, m4a). Decoding stops once
    ``end`` seconds are in hand: the first seconds of an hour-long file cost the first seconds.
    """
    stop = None if end is None else int(round(end * rate))
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError("no audio track")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks: list[np.ndarray] = []
        decoded = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    decoded += chunks[-1].size
                if stop is not None and decoded >= stop:
                    break
            else:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as err:
            if not chunks:
                raise MediaError(f"audio decode error: {str(err).splitlines()[0][:160]}") from err
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if audio.size == 0:
        raise MediaError("empty audio track")
    return audio[int(round(start * rate)):stop]


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | Iterator[np.ndarray],
    fps: float = 25.0,
    audio: np.ndarray | None = None,
    audio_rate: int = AUDIO_RATE,
    crf: int = 20,
) -> Path:
    """Write RGB uint8 frames as H.264 (yuv420p) mp4, with mono float audio muxed in as AAC.

    Writes to a temporary name beside ``path`` and renames, so a killed writer never leaves a
    half-written file under the final name.
    """
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1000)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        vstream = None
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=audio_rate, layout="mono")
        for img in frames:
            img = np.ascontiguousarray(img, dtype=np.uint8)
            if vstream is None:
                h, w = img.shape[:2]
                vstream = container.add_stream("libx264", rate=rate)
                vstream.width, vstream.height = w - w % 2, h - h % 2
                vstream.pix_fmt = "yuv420p"
                # identical bytes for identical frames: one thread, and no macroblock tree (with it,
                # libx264 encoded the same 160 px frames to 2-3 different streams in 10 tries)
                vstream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
            img = img[: vstream.height, : vstream.width]
            for packet in vstream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        if vstream is None:
            raise ValueError(f"write_video({path.name}): no frames given")
        for packet in vstream.encode():
            container.mux(packet)
        if astream is not None:
            _encode_audio(container, astream, np.asarray(audio, np.float32).reshape(-1), audio_rate)
    return path


def _encode_audio(container, stream, audio: np.ndarray, rate: int) -> None:
    frame_size = stream.codec_context.frame_size or 1024
    for i in range(0, len(audio), frame_size):
        chunk = audio[i : i + frame_size]
        if len(chunk) < frame_size:
            chunk = np.pad(chunk, (0, frame_size - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk[None, :].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_wav(path: str | os.PathLike, audio: np.ndarray, rate: int = AUDIO_RATE) -> Path:
    import soundfile as sf

    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.asarray(audio, np.float32), rate, format="WAV", subtype="PCM_16")
    return Path(path)
