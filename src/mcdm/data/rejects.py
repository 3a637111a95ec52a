"""What a data stage kept and what it rejected: tables, reject rows, the summary line, the merge.

Every data stage ends with :func:`finish_stage`, which writes (each atomically: ``x.tmp`` then rename)

- ``<out>/<table>.parquet``  the kept rows;
- ``<out>/rejects.csv``      ``file, stage, reason`` (header even when empty);
- ``<out>/summary.json``     kept / rejected by reason / seconds / video-seconds per wall-second,

prints the summary line, and stops with a one-line error naming the stage and the reject counts when
nothing survived. ``file`` is always the input file's path relative to the source folder, so every
input file can be followed through the stages; ``reason`` reads ``<code>: <detail>``, and a reject of
one clip of a video ends with ``[clip <clip_id>]``.

:func:`merge_rejects` and :func:`contact_sheet` make ``reports/data_rejects.csv`` and the contact sheet
of kept and rejected clips per reason (decisions.md #8): the paper's manual inspection, made easy.
"""
from __future__ import annotations

import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from mcdm.errors import McdmError
from mcdm.media.files import save_figure, write_csv, write_json, write_parquet
from mcdm.media.io import MediaError, iter_frames

REJECT_COLUMNS = ["file", "stage", "reason"]
_CLIP_TAG = re.compile(r"\[clip ([^\]]+)\]\s*$")
_SPAN = re.compile(r"\((\d+(?:\.\d+)?)-(\d+(?:\.\d+)?) s\)")


# ----------------------------------------------------------------------------------------- rows
def reject_row(file: str, stage: str, code: str, detail: str = "", clip_id: str | None = None) -> dict:
    """One reject: ``reason`` = ``code: detail [clip id]`` (``code`` is a short snake_case word)."""
    reason = f"{code}: {detail}" if detail else code
    if clip_id:
        reason += f" [clip {clip_id}]"
    return {"file": file, "stage": stage, "reason": reason}


def reason_code(reason: str) -> str:
    """``"too_short: 1.2 s < 2 s [clip x]"`` -> ``"too_short"``."""
    return re.split(r"[:\[]", str(reason), maxsplit=1)[0].strip()


def reason_clip(reason: str) -> str | None:
    """The clip a reject is about, or None for a whole-file reject."""
    m = _CLIP_TAG.search(str(reason))
    return m.group(1) if m else None


def rejects_frame(rows: Iterable[dict]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=REJECT_COLUMNS)


# -------------------------------------------------------------------------------------- summary
@dataclass
class StageSummary:
    stage: str
    kept: int
    unit: str
    rejected: dict[str, int]
    seconds: float
    video_seconds: float
    workers: int
    extra: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Video-seconds processed per wall-second."""
        return self.video_seconds / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        by_reason = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items(), key=lambda kv: -kv[1]))
        n_rej = sum(self.rejected.values())
        return (
            f"{self.stage}: kept {self.kept} {self.unit}, rejected {n_rej}"
            + (f" ({by_reason})" if by_reason else "")
            + f" in {self.seconds:.1f} s, {self.throughput:.2f} video-s/s ({self.workers} worker"
            + ("s" if self.workers != 1 else "")
            + ")"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rejected_total"] = sum(self.rejected.values())
        d["video_seconds_per_second"] = self.throughput
        return d


def finish_stage(
    stage: str,
    out_dir: str | os.PathLike,
    table: str,
    kept: pd.DataFrame,
    rejects: list[dict],
    started: float,
    video_seconds: float,
    workers: int,
    unit: str = "clips",
    extra: dict | None = None,
) -> StageSummary:
    """Write the kept table, rejects.csv and summary.json; print the summary line.

    Raises McdmError (non-zero exit) naming the stage and the reject counts when nothing survived;
    the rejects are written first so the user can see why.
    """
    out_dir = Path(out_dir)
    rej = rejects_frame(rejects)
    write_csv(rej, out_dir / "rejects.csv")
    summary = StageSummary(
        stage=stage,
        kept=len(kept),
        unit=unit,
        rejected=dict(Counter(reason_code(r) for r in rej["reason"])),
        seconds=time.perf_counter() - started,
        video_seconds=float(video_seconds),
        workers=workers,
        extra=extra or {},
    )
    write_json(summary.to_dict(), out_dir / "summary.json")
    print(summary.line(), file=sys.stderr, flush=True)
    if len(kept) == 0:
        (out_dir / f"{table}.parquet").unlink(missing_ok=True)  # no stale table from an earlier run
        counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.rejected.items())) or "no input"
        raise McdmError(f"{stage}: nothing survived ({counts}); see {out_dir / 'rejects.csv'}")
    write_parquet(kept, out_dir / f"{table}.parquet")
    return summary


# ------------------------------------------------------------------------------ merge + contact
def merge_rejects(stage_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate ``<dir>/rejects.csv`` of the given stages (missing ones are skipped), with a
    ``code`` column (the reason's first word) for counting."""
    frames = []
    for d in stage_dirs:
        p = Path(d) / "rejects.csv"
        if p.exists():
            frames.append(pd.read_csv(p, dtype=str, keep_default_na=False))
    rej = pd.concat(frames, ignore_index=True) if frames else rejects_frame([])
    rej = rej.reindex(columns=REJECT_COLUMNS + [c for c in rej.columns if c not in REJECT_COLUMNS])
    rej["code"] = [f"{s}/{reason_code(r)}" for s, r in zip(rej["stage"], rej["reason"])]
    return rej


def _thumbnail(path: str | os.PathLike | None, at: float, side: int) -> np.ndarray | None:
    """One frame of a video at ``at`` seconds, letterboxed to ``side`` x ``side``; None if unreadable."""
    import cv2


    if path is None or not Path(path).is_file():
        return None
    try:
        img = next(iter_frames(path, start=max(at, 0.0)), None)
        if img is None:
            img = next(iter_frames(path), None)
    except MediaError:
        return None
    if img is None:
        return None
    img = img[1]
    h, w = img.shape[:2]
    s = side / max(h, w)
    small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    canvas = np.full((side, side, 3), 24, np.uint8)
    y, x = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    canvas[y : y + small.shape[0], x : x + small.shape[1]] = small
    return canvas


def contact_sheet(
    kept: pd.DataFrame,
    rejects: pd.DataFrame,
    out_png: str | os.PathLike,
    clip_paths: dict[str, str] | None = None,
    source: str | os.PathLike | None = None,
    per_row: int = 6,
    side: int = 96,
) -> Path:
    """A PNG grid: one row of kept clips (``kept`` needs ``clip_id`` and ``crop_path``), then one row
    per reject reason (``stage/code``) with up to ``per_row`` examples captioned by file and reason.

    A rejected clip is shown from ``clip_paths[clip_id]``; a whole-file reject from the source video
    under ``source`` (an unreadable file shows as a dark tile with its reason).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clip_paths = clip_paths or {}
    rows: list[tuple[str, list[tuple[np.ndarray | None, str]]]] = []
    if len(kept):
        sample = kept.sort_values("clip_id").iloc[np.linspace(0, len(kept) - 1, min(per_row, len(kept))).astype(int)]
        tiles = []
        for _, r in sample.iterrows():
            tiles.append((_thumbnail(r.get("crop_path"), 0.5, side), str(r["clip_id"])))
        rows.append((f"kept ({len(kept)})", tiles))
    if len(rejects):
        rej = rejects.copy()
        if "code" not in rej:
            rej["code"] = [f"{s}/{reason_code(r)}" for s, r in zip(rej["stage"], rej["reason"])]
        for code, group in sorted(rej.groupby("code"), key=lambda kv: kv[0]):
            tiles = []
            for _, r in group.head(per_row).iterrows():
                clip = reason_clip(r["reason"])
                span = _SPAN.search(str(r["reason"]))  # "(a-b s)": in the clip's time, else the file's
                at = (float(span.group(1)) + float(span.group(2))) / 2 if span else 0.5
                path = clip_paths.get(clip) if clip else None
                if path is None and source:
                    path = Path(source) / r["file"]
                tiles.append((_thumbnail(path, at, side), f"{Path(str(r['file'])).name[:22]}\n{str(r['reason'])[:40]}"))
            rows.append((f"{code} ({len(group)})", tiles))
    if not rows:
        rows.append(("nothing to show", []))
    fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row * 1.9, len(rows) * 2.3), squeeze=False)
    for ax_row, (title, tiles) in zip(axes, rows):
        for j, ax in enumerate(ax_row):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(tiles):
                img, caption = tiles[j]
                ax.imshow(img if img is not None else np.full((side, side, 3), 40, np.uint8))
                if img is None:
                    ax.text(0.5, 0.5, "unreadable", color="w", ha="center", va="center", transform=ax.transAxes, fontsize=7)
                ax.set_xlabel(caption, fontsize=5.5)
        ax_row[0].set_ylabel(title, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle("data pipeline: kept clips and rejects per reason", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=110)
