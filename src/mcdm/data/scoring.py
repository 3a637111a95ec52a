"""Score the data filters against the sample generator's planted defects; the data report.

``data_report`` writes, under ``reports/``:

- ``data_rejects.csv``: every data stage's rejects (``file, stage, reason, code``);
- ``data_contact_sheet.png``: kept clips and rejects per reason;
- ``data_outcomes.csv`` (with a manifest): one row per raw video: its planted kind, the stage and
  reason that dropped it or the clips and seconds that survived;
- ``data_pipeline.json`` (a DVC metric): each stage's summary (kept, rejects by reason, seconds,
  video-seconds per wall-second), the filter scores below, and the 1 vs 2 worker throughput.

Scores (with ``data/sample/manifest.csv``; "kept" means in the last table given, e.g. quality's):

- ``scene_cut``: precision / recall of detected cuts against planted cuts, matched one to one within
  2 frames, over every video the scenes stage processed (long-term videos are not cut);
- ``no_face``: recall = planted no-face segments absent from every kept face clip (overlap <= 2
  frames), precision = videos with a faces ``no_face`` reject that had a planted segment;
- ``two_faces``: recall = planted two-face videos with nothing kept; precision = videos with a
  ``multiple_faces`` reject that were planted;
- ``low_quality`` (and ``blurred``, ``low_res`` alone, recall only): recall = planted videos with
  nothing kept; precision = videos with a quality reject that were planted;
- ``corrupt`` / ``no_audio``: recall = planted files rejected by ingest; precision likewise;
- ``av_shift`` (when a ``sync*`` stage's rejects are given): recall = planted out-of-sync videos
  the sync filter rejected; precision = videos it rejected that were planted;
- ``too_long``: every kept clip of a too-long video is within ``data.max_clip_seconds``;
- ``clean_kept``: clean videos with at least one kept clip (target >= 0.95), and the kept share of
  their seconds.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mcdm.config import Params
from mcdm.data.faces import faces
from mcdm.data.rejects import contact_sheet, merge_rejects, reason_code
from mcdm.data.scenes import scenes
from mcdm.media.files import write_csv, write_json, write_parquet

TOL_FRAMES = 2
QUALITY_KINDS = ("blurred", "low_res")


# ----------------------------------------------------------------------------------------- maths
def match_events(true: list[float], found: list[float], tol: float) -> int:
    """Largest one-to-one matching of sorted event times within ``tol`` (greedy is optimal on a line)."""
    true, found = sorted(true), sorted(found)
    i = j = matched = 0
    while i < len(true) and j < len(found):
        if abs(true[i] - found[j]) <= tol:
            matched += 1
            i += 1
            j += 1
        elif found[j] < true[i]:
            j += 1
        else:
            i += 1
    return matched


def precision_recall(tp: int, n_found: int, n_true: int) -> dict:
    return {
        "precision": tp / n_found if n_found else None,
        "recall": tp / n_true if n_true else None,
        "true": n_true,
        "found": n_found,
        "matched": tp,
    }


def _frames(cell) -> list[int]:
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return []
    return [int(float(x)) for x in str(cell).replace(",", ";").split(";") if x.strip() not in ("", "nan")]


def _num(cell) -> float | None:
    try:
        v = float(cell)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(v) else v


def _truthy(cell) -> bool:
    return str(cell).strip().lower() in {"1", "true", "yes"}


# --------------------------------------------------------------------------------------- scoring
def score_filters(manifest: pd.DataFrame, tables: dict[str, pd.DataFrame], rejects: pd.DataFrame,
                  kept: pd.DataFrame, params: Params) -> tuple[dict, pd.DataFrame]:
    """The scores of the module docstring and the per-video outcomes table."""
    fps = params.data.fps
    tol = TOL_FRAMES / fps
    man = manifest.copy()
    man["file"] = man["file"].astype(str)
    kind = dict(zip(man["file"], man["kind"].astype(str)))
    videos = tables.get("ingest", pd.DataFrame(columns=["file"]))
    ingested = set(videos["file"])
    by_file_rej = {f: g for f, g in rejects.groupby("file")} if len(rejects) else {}
    faces = tables.get("faces", pd.DataFrame(columns=["file", "start", "end", "duration"]))

    def flagged(stage: str, codes: set[str]) -> set[str]:
        if rejects.empty:
            return set()
        m = (rejects["stage"] == stage) & rejects["reason"].map(reason_code).isin(codes)
        return set(rejects.loc[m, "file"])

    def planted(*kinds: str) -> set[str]:
        return {f for f, k in kind.items() if k in kinds}

    kept_files = set(kept["file"]) if len(kept) else set()
    scores: dict = {}

    # scene cuts: every video the scenes stage cut (ingested, not long-term)
    cuts = tables.get("cuts", pd.DataFrame(columns=["file", "time"]))
    found_by_file = cuts.groupby("file")["time"].apply(list).to_dict() if len(cuts) else {}
    tp = n_true = n_found = 0
    for _, row in man.iterrows():
        f = row["file"]
        if f not in ingested or _truthy(row.get("long_term")):
            continue
        vfps = _num(row.get("fps")) or fps
        true = [c / vfps for c in _frames(row.get("scene_cuts"))]
        found = found_by_file.get(f, [])
        tp += match_events(true, found, tol)
        n_true += len(true)
        n_found += len(found)
    scores["scene_cut"] = {**precision_recall(tp, n_found, n_true), "tolerance_frames": TOL_FRAMES}

    # no-face segments: absent from every kept face clip
    nf = planted("no_face_segment")
    caught = set()
    for f in nf:
        row = man.loc[man["file"] == f].iloc[0]
        a, b = _num(row.get("no_face_start")), _num(row.get("no_face_end"))
        clips = faces[faces["file"] == f]
        if a is None or b is None:
            continue
        overlap = [max(0.0, min(b, e) - max(a, s)) for s, e in zip(clips["start"], clips["end"])]
        if not overlap or max(overlap) <= tol:
            caught.add(f)
    nf_flag = flagged("faces", {"no_face"})
    scores["no_face"] = _pr_sets(caught, nf_flag, nf)

    # two faces, low quality: nothing kept
    for name, kinds, stage, codes in (
        ("two_faces", ("two_faces",), "faces", {"multiple_faces"}),
        ("low_quality", QUALITY_KINDS, "quality", None),
        ("blurred", ("blurred",), "quality", None),
        ("low_res", ("low_res",), "quality", None),
    ):
        pl = planted(*kinds)
        gone = {f for f in pl if f not in kept_files}
        if codes is None:
            flag = set(rejects.loc[rejects["stage"] == stage, "file"]) if len(rejects) else set()
        else:
            flag = flagged(stage, codes)
        scores[name] = _pr_sets(gone, flag, pl)
        if name in QUALITY_KINDS:  # one filter catches both kinds: its precision is low_quality's
            scores[name]["precision"] = None

    # corrupt files and missing audio: rejected by ingest
    ingest_bad = flagged("ingest", {"unreadable", "truncated", "no_video", "not_video"})
    scores["corrupt"] = _pr_sets(planted("corrupt") & ingest_bad, ingest_bad, planted("corrupt"))
    no_audio_flag = flagged("ingest", {"no_audio", "silent_audio"})
    scores["no_audio"] = _pr_sets(planted("no_audio") & no_audio_flag, no_audio_flag, planted("no_audio"))

    # out-of-sync audio: the sync filter's job, scored when its rejects are among the stages
    sync_stages = {st for st in rejects["stage"].unique() if str(st).startswith("sync")} if len(rejects) else set()
    if sync_stages:
        pl = planted("av_shift")
        flag = set(rejects.loc[rejects["stage"].isin(sync_stages), "file"])
        scores["av_shift"] = _pr_sets(flag & pl, flag, pl)

    # too long: split into clips that fit
    tl = planted("too_long")
    tl_kept = kept[kept["file"].isin(tl)] if len(kept) else kept
    longest = float(tl_kept["duration"].max()) if len(tl_kept) else 0.0
    scores["too_long"] = {
        "videos": len(tl),
        "with_kept_clips": int(tl_kept["file"].nunique()) if len(tl_kept) else 0,
        "longest_kept_clip_s": longest,
        "within_max": bool(longest <= params.data.max_clip_seconds + 1e-6),
    }

    # clean videos: kept, and how much of them
    clean = planted("clean")
    dur = dict(zip(man["file"], man["duration"].astype(float)))
    kept_s = kept.groupby("file")["duration"].sum().to_dict() if len(kept) else {}
    scores["clean_kept"] = {
        "videos": len(clean),
        "kept": len(clean & kept_files),
        "rate": len(clean & kept_files) / len(clean) if clean else None,
        "seconds_rate": (sum(kept_s.get(f, 0.0) for f in clean) / sum(dur[f] for f in clean)) if clean else None,
    }
    for k in ("long_term", "av_shift", "scene_cut"):
        pl = planted(k)
        if pl:
            scores[f"{k}_kept"] = {"videos": len(pl), "kept": len(pl & kept_files), "rate": len(pl & kept_files) / len(pl)}

    recalls = [scores[k]["recall"] for k in ("scene_cut", "no_face", "two_faces", "low_quality", "corrupt", "no_audio")
               if scores[k]["recall"] is not None]
    scores["targets"] = {
        "planted_recall_is_1": bool(recalls) and min(recalls) >= 1.0,
        "clean_kept_at_least_0.95": scores["clean_kept"]["rate"] is not None and scores["clean_kept"]["rate"] >= 0.95,
    }

    # per-video outcomes
    rows = []
    for _, row in man.iterrows():
        f = row["file"]
        rej = by_file_rej.get(f)
        first = rej.iloc[0] if rej is not None and len(rej) else None
        rows.append({
            "file": f, "kind": row["kind"], "duration": row.get("duration"),
            "kept_clips": int((kept["file"] == f).sum()) if len(kept) else 0,
            "kept_seconds": float(kept_s.get(f, 0.0)),
            "rejects": int(len(rej)) if rej is not None else 0,
            "first_reject": f"{first['stage']}/{reason_code(first['reason'])}" if first is not None else "",
            "reasons": " | ".join(sorted({f"{s}/{reason_code(r)}" for s, r in zip(rej["stage"], rej["reason"])})) if rej is not None else "",
        })
    return scores, pd.DataFrame(rows)


def _pr_sets(caught: set, flagged: set, planted: set) -> dict:
    """Video-level recall (``caught`` of ``planted``) and precision (``flagged`` that are planted)."""
    return {
        "precision": len(flagged & planted) / len(flagged) if flagged else None,
        "recall": len(caught & planted) / len(planted) if planted else None,
        "planted": len(planted),
        "caught": len(caught & planted),
        "flagged": len(flagged),
    }


# ------------------------------------------------------------------------------------ throughput
def bench_throughput(videos_path: str | os.PathLike, params: Params, n_videos: int) -> dict:
    """scenes + faces on the first ``n_videos`` ingested (non long-term) videos, 1 then 2 workers,
    each run exactly as ``data.workers`` would make it (2 workers: a LocalCluster per stage, its
    start and stop inside the timed wall time)."""
    videos = pd.read_parquet(videos_path)
    videos = videos[~videos["long_term"].fillna(False).astype(bool)].sort_values("file").head(n_videos)
    out = {"videos": len(videos), "video_seconds": float(videos["duration"].sum()), "stages": "scenes+faces",
           "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="mcdm-bench-") as tmp:
        write_parquet(videos, Path(tmp) / "videos.parquet")
        for workers in (1, 2):
            t0 = time.perf_counter()
            scenes(Path(tmp) / "videos.parquet", Path(tmp) / f"scenes{workers}", params, workers=workers)
            faces(Path(tmp) / f"scenes{workers}" / "clips.parquet", Path(tmp) / f"faces{workers}", params, workers=workers)
            wall = time.perf_counter() - t0
            out[f"workers_{workers}"] = {"seconds": wall, "video_s_per_s": out["video_seconds"] / wall}
    out["speedup"] = out["workers_2"]["video_s_per_s"] / out["workers_1"]["video_s_per_s"]
    return out


# ---------------------------------------------------------------------------------------- report
def _load_tables(stage_dirs: list[Path]) -> dict[str, pd.DataFrame]:
    names = {"videos.parquet": "ingest", "clips.parquet": "scenes", "cuts.parquet": "cuts",
             "faces.parquet": "faces", "kept.parquet": None}
    tables = {}
    for d in stage_dirs:
        for fname, key in names.items():
            p = d / fname
            if p.exists():
                tables[key or d.name] = pd.read_parquet(p)
    return tables


def data_report(stage_dirs, kept_path, out_dir, params: Params, source=None, manifest=None,
                bench_videos: int = 0) -> dict:
    stage_dirs = [Path(d) for d in stage_dirs]
    out_dir = Path(out_dir)
    rejects = merge_rejects(stage_dirs)
    write_csv(rejects, out_dir / "data_rejects.csv")
    kept = pd.read_parquet(kept_path) if Path(kept_path).exists() else pd.DataFrame(columns=["clip_id", "file", "crop_path", "duration"])
    tables = _load_tables(stage_dirs)
    clip_paths: dict[str, str] = {}
    for key in ("scenes", "faces"):
        t = tables.get(key)
        if t is not None:
            col = "path" if key == "scenes" else "crop_path"
            clip_paths.update(dict(zip(t["clip_id"], t[col])))
    contact_sheet(kept, rejects, out_dir / "data_contact_sheet.png", clip_paths=clip_paths, source=source)

    report: dict = {"stages": {}, "quality_backend": params.data.quality.backend, "face_detector": params.data.face_detector}
    import json

    for d in stage_dirs:
        p = d / "summary.json"
        if p.exists():
            s = json.loads(p.read_text())
            report["stages"][s["stage"]] = {k: s[k] for k in ("kept", "rejected_total", "rejected", "seconds",
                                                               "video_seconds", "video_seconds_per_second", "workers")}
    if manifest and Path(manifest).exists():
        man = pd.read_csv(manifest, keep_default_na=False, na_values=[""])
        scores, outcomes = score_filters(man, tables, rejects, kept, params)
        report["scores"] = scores
        write_csv(outcomes, out_dir / "data_outcomes.csv")
    if bench_videos > 0 and "ingest" in tables:
        report["throughput"] = bench_throughput(stage_dirs[0] / "videos.parquet", params, bench_videos)
    write_json(report, out_dir / "data_pipeline.json")
    return report
