"""ingest: list the raw videos of ``data.source`` and keep those the pipeline can use (decisions.md #7).

Every file under the source folder (recursively; hidden files and ``manifest.csv`` aside) ends up
either in ``videos.parquet`` or in ``rejects.csv`` with a reason. When the folder holds a
``manifest.csv`` (the sample data), the inputs are the files it lists plus every file with a video
extension; its other files (``truth/``, ``identities/``) are the dataset's metadata, not inputs.

- ``missing``: listed in ``manifest.csv`` but absent;
- ``symlink_outside``: a link pointing outside the source folder (never followed);
  ``broken_symlink``; ``duplicate``: a link to a file already listed;
- ``not_video``: an extension other than mp4/mkv/mov/webm/avi/m4v;
- ``unreadable``: FFmpeg cannot open it (corrupt, truncated mp4 without index, not media);
  ``no_video``: no video stream or no decodable frame; ``truncated``: no frame decodes near the
  stated end; ``bad_frame_rate``;
- ``no_audio``: no audio track; ``silent_audio``: the 90th percentile of 0.25 s RMS levels is below
  ``data.silence_dbfs``;
- ``too_short``: shorter than ``data.min_clip_seconds``; ``too_small``: frame smaller than a face
  of ``data.min_face_px``.

``source_id`` groups videos that must stay on one side of the split: the manifest's ``identity``
when ``<source>/manifest.csv`` exists (the sample data), else the parent folder name for videos in
per-identity folders, else the file stem. ``video_id`` is the stem made filesystem-safe (ASCII
letters, digits, ``_-``), with a short hash of the path when that changed it or collided.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import time
import unicodedata
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from mcdm.config import Params
from mcdm.data.parallel import Crashed, map_videos
from mcdm.data.rejects import StageSummary, finish_stage, reject_row
from mcdm.errors import McdmError
from mcdm.media.io import MediaError, iter_frames, probe, read_audio

STAGE = "ingest"
VIDEO_EXTS = {".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v"}
MANIFEST = "manifest.csv"
LEVEL_RATE = 4000  # Hz: enough to tell speech from silence, 4x less memory than 16 kHz
VIDEO_COLUMNS = ["video_id", "file", "path", "source_id", "duration", "fps", "width", "height", "has_audio",
                 "long_term", "language", "audio_dbfs"]


@dataclass(frozen=True)
class Candidate:
    file: str  # path relative to the source folder (POSIX)
    path: str  # path to open (as given under the source folder)
    video_id: str
    source_id: str
    long_term: bool
    language: str | None


# ------------------------------------------------------------------------------------- listing
def safe_id(stem: str) -> str:
    """ASCII letters, digits, ``_`` and ``-`` only (accents folded, the rest become ``_``)."""
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_stem).strip("_") or "video"


def _read_manifest(source: Path) -> dict[str, dict]:
    path = source / MANIFEST
    if not path.exists():
        return {}
    man = pd.read_csv(path, dtype={"file": str, "identity": str, "language": str}, keep_default_na=False)
    if "file" not in man.columns:
        raise McdmError(f"{path}: no 'file' column")
    return {str(r["file"]): dict(r) for _, r in man.iterrows()}


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _file_kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "a special file"


def list_source(source: str | os.PathLike) -> tuple[list[Candidate], list[dict]]:
    """Walk the source folder (links not followed): the candidate videos and the files rejected
    without opening them."""
    src = Path(source)
    if not src.is_dir():
        raise McdmError(f"{STAGE}: source folder {src} does not exist (set data.source or --source)")
    root = src.resolve()
    manifest = _read_manifest(src)
    rejects: list[dict] = []
    found: list[tuple[str, Path]] = []  # (relative file, path)
    seen_real: dict[Path, str] = {}
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        for d in list(dirnames):
            p = here / d
            if d.startswith("."):
                dirnames.remove(d)
            elif p.is_symlink():  # never walk into linked folders: report them instead
                dirnames.remove(d)
                rel = p.relative_to(src).as_posix()
                target = p.resolve()
                if not _is_within(target, root):
                    rejects.append(reject_row(rel, STAGE, "symlink_outside", f"folder link to {target} outside the source folder"))
                else:
                    rejects.append(reject_row(rel, STAGE, "duplicate", "folder link inside the source folder (its files are listed from their real place)"))
        for name in sorted(filenames):
            if name.startswith(".") or (here == src and name == MANIFEST):
                continue
            p = here / name
            rel = p.relative_to(src).as_posix()
            if p.is_symlink():
                target = p.resolve()
                if not target.exists():
                    rejects.append(reject_row(rel, STAGE, "broken_symlink", f"link target {os.readlink(p)} does not exist"))
                    continue
                if not _is_within(target, root):
                    rejects.append(reject_row(rel, STAGE, "symlink_outside", f"link to {target} outside the source folder"))
                    continue
            if not p.is_file():  # a FIFO, socket or device named like a video would block its reader forever
                rejects.append(reject_row(rel, STAGE, "not_regular_file",
                                          f"{_file_kind(p)}, not a regular file: never opened"))
                continue
            if p.suffix.lower() not in VIDEO_EXTS and manifest and rel not in manifest:
                continue  # the dataset's own metadata (truth/, identities/), not an input
            if p.suffix.lower() not in VIDEO_EXTS:
                rejects.append(reject_row(rel, STAGE, "not_video", f"extension {p.suffix or '(none)'!r} is not one of {', '.join(sorted(VIDEO_EXTS))}"))
                continue
            found.append((rel, p))
    listed = {rel for rel, _ in found} | {r["file"] for r in rejects}
    for rel in sorted(set(manifest) - listed):
        rejects.append(reject_row(rel, STAGE, "missing", f"listed in {MANIFEST} but not in the folder"))
    # duplicates (a link to a listed file): the real file wins over its links
    found.sort(key=lambda rp: (rp[1].is_symlink(), rp[0]))
    candidates: list[Candidate] = []
    used_ids: set[str] = set()
    for rel, p in found:
        real = p.resolve()
        if real in seen_real:
            rejects.append(reject_row(rel, STAGE, "duplicate", f"same file as {seen_real[real]}"))
            continue
        seen_real[real] = rel
        stem = Path(rel).stem
        vid = safe_id(stem)
        if vid != stem or vid in used_ids:
            vid = f"{vid}_{hashlib.sha1(rel.encode()).hexdigest()[:6]}"
        used_ids.add(vid)
        row = manifest.get(rel, {})
        parent = Path(rel).parent.name
        source_id = str(row.get("identity") or "") or (parent if parent else stem)
        candidates.append(Candidate(
            file=rel,
            path=str(p),
            video_id=vid,
            source_id=source_id,
            long_term=str(row.get("long_term", "")).strip().lower() in {"1", "true", "yes"},
            language=(str(row.get("language")) or None) if row.get("language") else None,
        ))
    candidates.sort(key=lambda c: c.file)
    return candidates, rejects


# ------------------------------------------------------------------------------------- checking
def audio_level_dbfs(path: str, window_s: float = 0.25, percentile: float = 90.0) -> float:
    """The ``percentile`` of the RMS levels (dBFS) of ``window_s`` windows of the mono audio."""
    audio = read_audio(path, rate=LEVEL_RATE)
    n = max(1, int(window_s * LEVEL_RATE))
    usable = (len(audio) // n) * n
    windows = audio[:usable].reshape(-1, n) if usable else audio[None, :]
    rms = np.sqrt(np.mean(np.square(windows, dtype=np.float64), axis=1))
    level = float(np.percentile(rms, percentile))
    return 20.0 * np.log10(max(level, 1e-10))


def check_video(cand: Candidate, params: Params) -> dict:
    """Probe one candidate: a videos-table row, or a reject row (``{"reject": row}``)."""
    data = params.data

    def rej(code: str, detail: str = "") -> dict:
        return {"reject": reject_row(cand.file, STAGE, code, detail)}

    try:
        info = probe(cand.path)
    except MediaError as err:
        code = "no_video" if str(err) == "no video stream" else "unreadable"
        return rej(code, str(err))
    if not (0 < info.fps <= 1000):
        return rej("bad_frame_rate", f"frame rate {info.fps!r} fps")
    if info.duration <= 0:
        return rej("no_video", "no video duration in the container")
    if min(info.width, info.height) < data.min_face_px:
        return rej("too_small", f"{info.width}x{info.height} frames cannot hold a {data.min_face_px}px face")
    if info.duration < data.min_clip_seconds:
        return rej("too_short", f"{info.duration:.2f} s < data.min_clip_seconds {data.min_clip_seconds} s")
    try:
        if next(iter_frames(cand.path), None) is None:
            return rej("no_video", "no decodable video frame")
        tail = max(0.0, info.duration * 0.9 - 0.5)
        if next(iter_frames(cand.path, start=tail), None) is None:
            return rej("truncated", f"no frame decodes after {tail:.2f} s of a stated {info.duration:.2f} s")
    except MediaError as err:
        return rej("unreadable", str(err))
    if not info.has_audio:
        return rej("no_audio", "no audio track")
    try:
        dbfs = audio_level_dbfs(cand.path)
    except MediaError as err:
        return rej("no_audio", str(err))
    if dbfs < data.silence_dbfs:
        return rej("silent_audio", f"audio level {dbfs:.1f} dBFS < data.silence_dbfs {data.silence_dbfs}")
    return {
        "video_id": cand.video_id,
        "file": cand.file,
        "path": cand.path,
        "source_id": cand.source_id,
        "duration": float(info.duration),
        "fps": float(info.fps),
        "width": int(info.width),
        "height": int(info.height),
        "has_audio": True,
        "long_term": cand.long_term,
        "language": cand.language,
        "audio_dbfs": round(dbfs, 2),
    }


# ---------------------------------------------------------------------------------------- stage
def ingest(source: str | os.PathLike, out_dir: str | os.PathLike, params: Params,
           workers: int | None = None) -> tuple[pd.DataFrame, StageSummary]:
    """List, probe and check every file of ``source``; write ``<out>/videos.parquet`` + rejects."""
    started = time.perf_counter()
    workers = workers or params.data.workers
    candidates, rejects = list_source(source)
    if not candidates and not rejects:
        raise McdmError(f"{STAGE}: source folder {source} holds no files")
    results = map_videos(partial(check_video, params=params), candidates, workers, params.data.dask_address,
                         desc=STAGE, timeout=params.data.item_timeout_seconds)
    rows = []
    for cand, res in zip(candidates, results):
        if isinstance(res, Crashed):
            rejects.append(reject_row(cand.file, STAGE, res.code, res.reason))
        elif "reject" in res:
            rejects.append(res["reject"])
        else:
            rows.append(res)
    kept = pd.DataFrame(rows, columns=VIDEO_COLUMNS)
    summary = finish_stage(STAGE, out_dir, "videos", kept, rejects, started,
                           video_seconds=float(kept["duration"].sum()), workers=workers, unit="videos")
    return kept, summary
