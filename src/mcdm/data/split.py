"""split: train / test / open-set tables, by source group, deterministic.

Groups: ``source_id`` is the identity for the sample data (several joined with ``;`` for a video
holding two people, e.g. both sides of a scene cut) and per-identity folders, else the source video.
Source ids sharing an identity are one group (connected components), so no identity, and therefore
no source video, is ever on two sides. Every group gets a fixed pseudo-random rank,
``sha256(f"{data.split.seed}:{group}")``, independent of row order and of the training seed.

- ``open_set.parquet``: the ``data.split.open_set_identities`` lowest-ranked groups (never one holding a
  long-term video) are held out ENTIRELY, in neither train nor test: the paper's open-set test of
  unseen portraits. Each of their clips is a portrait row (all its columns) paired with one
  held-out audio clip from ``test``: ``audio_clip_id, audio_path, audio_language,
  audio_source_id, audio_duration, cross_language``; audio of another language than the portrait's
  is preferred, languages taken in turn so several appear.
- ``test.parquet``: every long-term clip (a whole video, kept for the long-term curve, never cut;
  its identity may also be seen in training, as in a split by video: the unseen-identity test is
  the open set), plus the regular clips of groups taken in rank order until at least
  ``data.split.test_fraction`` of the regular (non-long-term, non-open-set) clips are test.
- ``train.parquet``: the regular clips of all other groups. At least one group on each side.

Which group goes where (:func:`group_roles`) is decided on the clips BEFORE the sync filter
(``data/quality/kept.parquet``, ``--candidates``) and applied to the clips after it: the
``syncnet_train`` stage, which runs before the filter, computes the same roles with the same function
to keep every test and open-set identity out of the SyncNet that measures Sync-C / Sync-D
(``mcdm.train.syncnet``).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import pandas as pd

from mcdm.config import Params
from mcdm.data.rejects import StageSummary, finish_stage
from mcdm.errors import McdmError
from mcdm.media.files import read_table, write_parquet

STAGE = "split"
AUDIO_COLUMNS = ["audio_clip_id", "audio_path", "audio_language", "audio_source_id", "audio_duration", "cross_language"]


def group_rank(group: str, seed: int) -> int:
    return int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:16], 16)


def identity_groups(source_ids) -> dict[str, str]:
    """``source_id`` -> its group: source ids sharing any ``;``-separated identity are joined
    (union-find); a group is named by its smallest identity."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for sid in set(map(str, source_ids)):
        ids = [i.strip() for i in sid.split(";") if i.strip()] or [sid]
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            parent[max(a, b)] = min(a, b)
        find(ids[0])
    return {sid: find(([i.strip() for i in sid.split(";") if i.strip()] or [sid])[0]) for sid in set(map(str, source_ids))}


TRAIN, TEST, OPEN_SET = "train", "test", "open_set"


def _prepared(clips: pd.DataFrame) -> pd.DataFrame:
    clips = clips.copy()
    if "long_term" not in clips:
        clips["long_term"] = False
    if "language" not in clips:
        clips["language"] = None
    clips["long_term"] = clips["long_term"].fillna(False).astype(bool)
    return clips.sort_values("clip_id").reset_index(drop=True)


def group_roles(clips: pd.DataFrame, params: Params) -> tuple[dict[str, str], dict[str, str]]:
    """``(source_id -> group, group -> "train" | "test" | "open_set")`` for a clips table (``clip_id``,
    ``source_id``, optional ``long_term``), by the module docstring's rule."""
    sp = params.data.split
    clips = _prepared(clips)
    groups = identity_groups(clips["source_id"])
    group = clips["source_id"].astype(str).map(groups)
    ranked = sorted(group.unique(), key=lambda g: (group_rank(g, sp.seed), g))
    long_groups = set(group[clips["long_term"]])
    free = [g for g in ranked if g not in long_groups]
    n_open = sp.open_set_identities
    open_groups = set(free[:n_open])
    rest = [g for g in ranked if g not in open_groups]
    if len(free) < n_open or len(rest) < 2:
        raise McdmError(
            f"{STAGE}: {len(ranked)} source groups ({len(long_groups)} with long-term videos) cannot give "
            f"data.split.open_set_identities={n_open} held-out groups plus a train and a test group"
        )
    regular = ~group.isin(open_groups) & ~clips["long_term"]
    target = max(1, math.ceil(sp.test_fraction * int(regular.sum())))
    test_groups: set[str] = set()
    for g in rest:
        if int((regular & group.isin(test_groups)).sum()) >= target or len(rest) - len(test_groups) <= 1:
            break
        test_groups.add(g)
    roles = {g: OPEN_SET if g in open_groups else TEST if g in test_groups else TRAIN for g in ranked}
    return groups, roles


def clip_roles(clips: pd.DataFrame, params: Params, candidates: pd.DataFrame | None = None) -> pd.DataFrame:
    """``clips`` with ``group`` and ``role`` columns: a long-term clip is ``test``, every other clip
    takes its group's role; roles (and groups) are decided on ``candidates`` (default: ``clips``),
    which must hold every source id of ``clips``."""
    clips = _prepared(clips)
    groups, roles = group_roles(clips if candidates is None else candidates, params)
    unknown = sorted(set(clips["source_id"].astype(str)) - set(groups))
    if unknown:
        raise McdmError(f"{STAGE}: source ids {unknown[:3]} are not among the candidate clips the roles were decided on")
    clips["group"] = clips["source_id"].astype(str).map(groups)
    clips["role"] = [TEST if lt else roles[g] for g, lt in zip(clips["group"], clips["long_term"])]
    return clips


def split_clips(clips: pd.DataFrame, params: Params,
                candidates: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(train, test, open_set)`` as described in the module docstring, the roles decided on
    ``candidates`` (the clips before the sync filter; default: ``clips``)."""
    clips = clip_roles(clips, params, candidates)
    if not (clips["role"] == TRAIN).any() or not (clips["role"] == TEST).any():
        raise McdmError(f"{STAGE}: after the sync filter no clip is left on the "
                        f"{'train' if not (clips['role'] == TRAIN).any() else 'test'} side of the split")
    columns = [c for c in clips.columns if c not in ("group", "role")]
    train = clips.loc[clips["role"] == TRAIN, columns].reset_index(drop=True)
    test = clips.loc[clips["role"] == TEST, columns].reset_index(drop=True)
    open_set = pair_open_set(clips.loc[clips["role"] == OPEN_SET, columns], test)
    return train, test, open_set


def pair_open_set(portraits: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """Each held-out portrait clip with one held-out audio clip (other language first, in turn)."""
    cols = list(portraits.columns) + AUDIO_COLUMNS
    if portraits.empty:
        return pd.DataFrame(columns=cols)
    pool = test[~test["long_term"]] if (~test["long_term"]).any() else test
    if pool.empty:
        raise McdmError(f"{STAGE}: no test clip to give audio to the open-set portraits")
    by_lang: dict[str, list[dict]] = {}
    for row in pool.sort_values("clip_id").to_dict("records"):
        by_lang.setdefault(str(row.get("language") or ""), []).append(row)
    langs = sorted(by_lang)
    turn = {lang: 0 for lang in langs}
    rows = []
    for i, p in enumerate(portraits.sort_values("clip_id").to_dict("records")):
        mine = str(p.get("language") or "")
        others = [lang for lang in langs if lang != mine and lang] or langs
        lang = others[i % len(others)]
        audio = by_lang[lang][turn[lang] % len(by_lang[lang])]
        turn[lang] += 1
        rows.append({
            **p,
            "audio_clip_id": audio["clip_id"],
            "audio_path": audio.get("crop_path", audio.get("path")),
            "audio_language": audio.get("language"),
            "audio_source_id": audio["source_id"],
            "audio_duration": float(audio.get("duration", audio["n_frames"] / 25.0)),
            "cross_language": bool(mine and lang and lang != mine),
        })
    return pd.DataFrame(rows, columns=cols)


def split(clips_path: str | os.PathLike, out_dir: str | os.PathLike, params: Params,
          candidates_path: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, StageSummary]:
    """Write ``train.parquet``, ``test.parquet``, ``open_set.parquet`` (+ empty rejects, summary); the
    roles are decided on ``candidates_path`` (the clips before the sync filter) when given."""
    started = time.perf_counter()
    clips = read_table(clips_path, "sync_filter")
    if clips.empty:
        raise McdmError(f"{STAGE}: {clips_path} holds no clips")
    candidates = None if candidates_path is None else read_table(candidates_path, "quality")
    train, test, open_set = split_clips(clips, params, candidates)
    out_dir = Path(out_dir)
    write_parquet(test, out_dir / "test.parquet")
    write_parquet(open_set, out_dir / "open_set.parquet")

    def seconds(df: pd.DataFrame) -> float:
        return float(df["n_frames"].sum()) / params.data.fps if len(df) else 0.0

    extra = {
        name: {"clips": len(df), "groups": int(df["source_id"].nunique()) if len(df) else 0, "seconds": seconds(df)}
        for name, df in (("train", train), ("test", test), ("open_set", open_set))
    }
    extra["test"]["long_term_clips"] = int(test["long_term"].sum())
    summary = finish_stage(STAGE, out_dir, "train", train, [], started, video_seconds=seconds(clips),
                           workers=1, extra=extra)
    return train, test, open_set, summary
