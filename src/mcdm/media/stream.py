"""A video written while it is generated: fragmented MP4 (H.264 + AAC) that plays as it grows.

The muxer writes an empty ``moov`` header first and then one ``moof`` + ``mdat`` fragment per keyframe
interval (``movflags=frag_keyframe+empty_moov+default_base_moof``, each fragment flushed to the file
at once), so a player, ``ffprobe`` or a browser's ``<video>`` can read the file while the frames are
still coming, and the finished file is an ordinary MP4. The keyframe interval is ``fragment_seconds``
(a fragment leaves the encoder after the next keyframe arrives, plus the encoder's lookahead).
The audio is interleaved with the video as frames arrive (each fragment carries its own speech).

Unlike :func:`mcdm.media.io.write_video` the file is written in place, not renamed at the end: that
is the point. A writer stopped half-way leaves the fragments it finished, which play.

Every fragment that reaches the file is recorded (:attr:`FragmentedMp4.fragments`: frames written
so far, bytes on disk, seconds since the writer opened), so the caller can report when the first
playable fragment existed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import av
import numpy as np

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"


@dataclass(frozen=True)
class Fragment:
    frames: int  # video frames handed to the writer when the fragment reached the file
    bytes: int  # file size after it
    seconds: float  # since the writer opened (time.perf_counter)


class FragmentedMp4:
    """``with FragmentedMp4(path, fps, audio, rate) as out: out.add(frame)`` (RGB uint8 frames)."""

    def __init__(self, path: str | os.PathLike, fps: float, audio: Optional[np.ndarray] = None,
                 audio_rate: int = 16000, fragment_seconds: float = 1.0, crf: int = 20):
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1000)
        self.audio = None if audio is None else np.asarray(audio, np.float32).reshape(-1)
        self.audio_rate = int(audio_rate)
        self.keyint = max(1, int(round(float(fps) * fragment_seconds)))
        self.crf = crf
        self.started = time.perf_counter()
        self.fragments: list[Fragment] = []
        self.frames = 0
        self._audio_done = 0
        self._scanned = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 -- closed in close()
        self.container = av.open(self._file, mode="w", format="mp4",
                                 options={"movflags": MOVFLAGS, "flush_packets": "1"})
        self.video = None
        self.astream = None
        if self.audio is not None:
            self.astream = self.container.add_stream("aac", rate=self.audio_rate, layout="mono")

    # ------------------------------------------------------------------------------------------ writing
    def add(self, frame: np.ndarray) -> None:
        img = np.ascontiguousarray(frame, dtype=np.uint8)
        if self.video is None:
            h, w = img.shape[:2]
            self.video = self.container.add_stream("libx264", rate=self.fps)
            self.video.width, self.video.height = w - w % 2, h - h % 2
            self.video.pix_fmt = "yuv420p"
            self.video.gop_size = self.keyint
            self.video.options = {"crf": str(self.crf), "preset": "veryfast",
                                  "x264-params": f"keyint={self.keyint}:min-keyint={self.keyint}:scenecut=0"}
        img = img[: self.video.height, : self.video.width]
        vf = av.VideoFrame.from_ndarray(img, format="rgb24")
        vf.pts, vf.time_base = self.frames, 1 / self.fps
        self.frames += 1
        self._mux(self.video.encode(vf))
        self._audio_until(int(round(self.frames / float(self.fps) * self.audio_rate)))
        self._record()

    def _mux(self, packets) -> None:
        for packet in packets:
            self.container.mux(packet)

    def _audio_until(self, sample: int, final: bool = False) -> None:
        """Encode the audio up to ``sample`` in whole AAC frames (the rest, padded, when ``final``)."""
        if self.astream is None:
            return
        size = self.astream.codec_context.frame_size or 1024
        stop = min(sample, self.audio.size)
        while self._audio_done + size <= stop or (final and self._audio_done < stop):
            chunk = self.audio[self._audio_done:self._audio_done + size]
            if chunk.size < size:
                chunk = np.pad(chunk, (0, size - chunk.size))
            af = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            af.sample_rate, af.pts, af.time_base = self.audio_rate, self._audio_done, Fraction(1, self.audio_rate)
            self._audio_done += size
            self._mux(self.astream.encode(af))

    def _record(self) -> None:
        """Note every new ``moof`` box that reached the file since the last look."""
        size = self._file.tell()
        if size <= self._scanned:
            return
        self._file.flush()
        with open(self.path, "rb") as fh:
            pos = self._scanned
            while pos + 8 <= size:
                fh.seek(pos)
                head = fh.read(8)
                length = int.from_bytes(head[:4], "big")
                if head[4:8] == b"moof":
                    self.fragments.append(Fragment(self.frames, size, time.perf_counter() - self.started))
                if length < 8 or pos + length > size:
                    break
                pos += length
        self._scanned = pos

    def close(self) -> None:
        if self.container is None:
            return
        try:
            if self.video is not None:
                self._mux(self.video.encode(None))
            self._audio_until(self.audio.size if self.audio is not None else 0, final=True)
            if self.astream is not None:
                self._mux(self.astream.encode(None))
            self.container.close()
            self._record()
        finally:
            self.container = None
            self._file.close()

    @property
    def first_fragment_seconds(self) -> Optional[float]:
        return self.fragments[0].seconds if self.fragments else None

    def __enter__(self) -> "FragmentedMp4":
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close()
        if kind is not None and not self.fragments:  # failed before anything playable: leave no file
            self.path.unlink(missing_ok=True)
