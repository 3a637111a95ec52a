"""talkingface-wild-mini: plan, render and write the sample dataset with its ground truth.

``generate_sample(out_dir, sample_params)`` writes

- ``<video_id>.mp4`` (H.264 + AAC 16 kHz mono, 25 fps) for every video,
- ``manifest.csv``: one row per file with its identity, language, text, kind and planted defects
  (see :data:`MANIFEST_COLUMNS`),
- ``truth/<video_id>.npz``: per-frame ``mouth_open``, ``blink``, ``head_pose`` (yaw, pitch, roll
  in degrees, tx, ty in pixels), ``expression`` (0 neutral, 1 smile, 2 brow raise) and the speech
  ``envelope`` the mouth was driven by (before any planted audio shift). Two-face videos describe
  the speaker (left); scene-cut videos use one track across the cut,
- ``identities/<identity>.png`` (a clean portrait of each identity) and ``identities/identities.csv``.

Every video has its own seed derived from ``(sample.seed, index)``, so the output does not depend on
how many worker processes render it (checked byte for byte in the tests). The folder is written
under a temporary name and renamed.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pandas as pd

from mcdm.config import SampleParams
from mcdm.data.parallel import Crashed, map_videos
from mcdm.data.sample import defects as D
from mcdm.data.sample.animate import FaceRig
from mcdm.data.sample.motion import MotionTrack, make_track
from mcdm.data.sample.portraits import RECIPES, Portrait, build_identities
from mcdm.data.sample.speech import (
    AUDIO_RATE,
    LANGUAGES,
    VOICE_VARIANTS,
    Speech,
    SpeechRequest,
    mouth_opening,
    synthesize_fresh,
)
from mcdm.errors import McdmError
from mcdm.media.io import write_video

MANIFEST_COLUMNS = ["file", "video_id", "identity", "language", "text", "duration", "fps", "n_frames", "kind",
                    "defects", "scene_cuts", "no_face_start", "no_face_end", "audio_shift_s", "long_term", "seed"]
TRUTH_KEYS = ("mouth_open", "blink", "head_pose", "expression", "envelope")


@dataclass(frozen=True)
class VideoSpec:
    """What one sample video will be; everything else follows from its seed."""

    index: int
    video_id: str
    kind: str
    identities: tuple[str, ...]
    language: str
    duration: float
    seed: int
    size: int
    fps: float


# ---------------------------------------------------------------------------------------------
# planning


def defect_counts(n_videos: int) -> dict[str, int]:
    """How many videos of each defect kind: ``max(1, round(n * share))``, fewer when n is small.

    At least a fifth of the videos stay clean; when that leaves no room for one of every defect,
    defects are dropped from the end of :data:`defects.DEFECT_KINDS`.
    """
    counts = {k: max(1, int(math.floor(n_videos * D.DEFECT_SHARE[k] + 0.5))) for k in D.DEFECT_KINDS}
    room = n_videos - max(1, math.ceil(0.2 * n_videos))
    if sum(counts.values()) > room:
        counts = {k: 1 if i < room else 0 for i, k in enumerate(D.DEFECT_KINDS)}
    return counts


def _video_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _family(identity: str) -> str:
    return RECIPES[identity]["base"]


def plan_videos(sample: SampleParams) -> list[VideoSpec]:
    """The list of videos for these params (deterministic in ``sample.seed``)."""
    if sample.seconds_max < sample.seconds_min:
        raise McdmError(f"sample.seconds_max ({sample.seconds_max}) < sample.seconds_min ({sample.seconds_min})")
    rng = np.random.default_rng(sample.seed)
    ids = list(RECIPES)[: sample.n_identities]
    counts = defect_counts(sample.n_videos)
    n_clean = sample.n_videos - sum(counts.values())
    kinds = ["clean"] * n_clean + [k for k, c in counts.items() for _ in range(c)]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))] + ["long_term"] * sample.n_long
    # identities of clean videos: every identity once, the rest weighted so some appear often
    weights = 1.0 / (1.0 + 0.35 * np.arange(len(ids)))
    weights /= weights.sum()
    extra = rng.choice(len(ids), size=max(0, n_clean - len(ids)), p=weights)
    clean_ids = list(ids) + [ids[int(i)] for i in extra]
    clean_ids = [clean_ids[i] for i in rng.permutation(len(clean_ids))][:n_clean]
    # languages: one shuffled cycle through all ten, clean videos first, so the clean videos cover
    # every language when there are ten of them and the whole set does when it has ten videos
    lang_cycle = [LANGUAGES[i] for i in rng.permutation(len(LANGUAGES))]
    specs = []
    n_clean_seen = 0
    n_other_seen = 0
    for index, kind in enumerate(kinds):
        scale = sample.time_scale
        duration = float(rng.uniform(sample.seconds_min, sample.seconds_max)) * scale
        if kind == "clean":
            who: tuple[str, ...] = (clean_ids[n_clean_seen],)
            language = lang_cycle[n_clean_seen % len(lang_cycle)]
            n_clean_seen += 1
        else:
            language = lang_cycle[(n_clean + n_other_seen) % len(lang_cycle)]
            n_other_seen += 1
            first = ids[int(rng.choice(len(ids), p=weights))] if kind == "long_term" else ids[int(rng.integers(len(ids)))]
            who = (first,)
            if kind in ("scene_cut", "two_faces"):
                others = [i for i in ids if _family(i) != _family(first)] or [i for i in ids if i != first]
                who = (first, others[int(rng.integers(len(others)))])
        if kind == "too_long":
            duration = max(31.0, sample.too_long_seconds * scale)
        elif kind == "long_term":
            duration = sample.long_seconds * scale
        elif kind in ("no_face_segment", "scene_cut"):
            duration = max(duration, 5.0)
        duration = max(round(duration * sample.fps) / sample.fps, 1.0)
        specs.append(VideoSpec(index, f"tfw_{index:03d}", kind, who, language, duration,
                               _video_seed(sample.seed, index), sample.size, sample.fps))
    return specs


# ---------------------------------------------------------------------------------------------
# rendering one video (runs in a worker process)

_RIGS: dict[str, FaceRig] = {}  # per worker process: identity -> rig (built once)


def _rig(portrait: Portrait) -> FaceRig:
    rig = _RIGS.get(portrait.name)
    if rig is None or rig.portrait.image.shape != portrait.image.shape:
        rig = _RIGS[portrait.name] = FaceRig(portrait)
    return rig


def _grade(rng: np.random.Generator) -> np.ndarray:
    """A per-shot colour grade (white balance and exposure) as a (256, 1, 3) lookup table."""
    gain = rng.uniform(0.9, 1.08, 3) * rng.uniform(0.92, 1.06)
    lift = rng.uniform(-6, 6)
    x = np.arange(256, dtype=np.float32)[:, None]
    return np.clip(x * gain[None] + lift, 0, 255).astype(np.uint8)[:, None, :]


def _voice(identity: str) -> tuple[str, int]:
    i = list(RECIPES).index(identity)
    return VOICE_VARIANTS[i % len(VOICE_VARIANTS)], 40 + 7 * (i % 5)


def speech_request(spec: VideoSpec) -> SpeechRequest:
    variant, pitch = _voice(spec.identities[0])
    seed = int(np.random.SeedSequence([spec.seed, 1]).generate_state(1)[0])
    return SpeechRequest(spec.duration, spec.language, seed, variant, pitch)


def render_video(spec: VideoSpec, speech: Speech, portraits: dict[str, Portrait], out_dir: Path) -> dict:
    """Render, encode and (for some defects) damage one video; returns its manifest row.

    ``speech`` is what :func:`speech_request` asked eSpeak NG for (see ``speech.synthesize_fresh``);
    ``portraits`` holds (at least) the video's identities.
    """
    cv2.setNumThreads(1)  # one video per worker process; cv2's own threads would only compete
    rng = np.random.default_rng([spec.seed, 2])
    n = int(round(spec.duration * spec.fps))
    mouth, env = mouth_opening(speech, n, spec.fps)
    track = make_track(rng, mouth, env, spec.fps)
    row = dict(file=f"{spec.video_id}.mp4", video_id=spec.video_id, identity=";".join(spec.identities),
               language=spec.language, text=speech.text, duration=round(n / spec.fps, 3), fps=spec.fps, n_frames=n,
               kind=spec.kind, defects="" if spec.kind in D.CLEAN_KINDS else spec.kind, scene_cuts="",
               no_face_start=None, no_face_end=None, audio_shift_s=0.0, long_term=spec.kind == "long_term",
               seed=spec.seed)
    frames = _frames(spec, [_rig(portraits[name]) for name in spec.identities], track, rng, row)
    audio = speech.audio
    if spec.kind == "av_shift":
        shift = float(rng.uniform(*D.SHIFT_RANGE)) * (1 if rng.random() < 0.5 else -1)
        row["audio_shift_s"] = round(shift, 3)
        audio = D.shift_audio(audio, row["audio_shift_s"], AUDIO_RATE)
    path = out_dir / row["file"]
    write_video(path, frames, fps=spec.fps, audio=None if spec.kind == "no_audio" else audio, audio_rate=AUDIO_RATE)
    if spec.kind == "corrupt":
        D.truncate(path)
    truth_dir = out_dir / "truth"
    truth_dir.mkdir(exist_ok=True)
    np.savez_compressed(truth_dir / f"{spec.video_id}.npz", **track.truth())
    return row


def _frames(spec: VideoSpec, rigs: list[FaceRig], track: MotionTrack, rng: np.random.Generator,
            row: dict) -> Iterator[np.ndarray]:
    """Frame generator for one video (decides the per-kind ground truth in ``row`` eagerly)."""
    n = len(track)
    rig = rigs[0]
    grades = [_grade(rng)]
    cut = None
    cover = None
    second: tuple[FaceRig, MotionTrack] | None = None
    if spec.kind == "scene_cut":
        cut = int(rng.integers(int(0.35 * n), int(0.65 * n)))
        row["scene_cuts"] = str(cut)
        grades.append(_grade(rng))
    elif spec.kind == "no_face_segment":
        length = int(np.ceil(rng.uniform(*D.NO_FACE_SECONDS) * spec.fps))
        start = int(rng.integers(int(0.2 * n), max(int(0.2 * n) + 1, n - length - int(0.2 * n))))
        end = min(start + length, n - D.COVER_SLIDE_FRAMES - 1)
        row["no_face_start"], row["no_face_end"] = round(start / spec.fps, 3), round(end / spec.fps, 3)
        cover = (D.cover_amount(n, start, end), D.occluder(spec.size, spec.size, rng))
    elif spec.kind == "two_faces":
        # the listener: own blinks and head motion, small mouth movements
        quiet = 0.15 * np.clip(np.abs(np.sin(np.arange(n) / 9.0)), 0, 1).astype(np.float32)
        second = (rigs[1], make_track(rng, quiet, np.zeros(n, np.float32), spec.fps))

    def gen() -> Iterator[np.ndarray]:
        for f in range(n):
            state = track.state(f)
            if cut is not None and f >= cut:
                img = cv2.LUT(rigs[1].render(state), grades[1])
            else:
                img = cv2.LUT(rig.render(state), grades[0])
            if second is not None:
                img = np.concatenate([img, cv2.LUT(second[0].render(second[1].state(f)), grades[0])], 1)
            if cover is not None:
                img = D.cover(img, cover[1], float(cover[0][f]))
            if spec.kind == "blurred":
                img = D.blur(img)
            elif spec.kind == "low_res":
                img = D.low_res(img)
            yield img

    return gen()


# ---------------------------------------------------------------------------------------------
# the whole set


def _render_item(item: tuple[VideoSpec, Speech, dict[str, Portrait]], out_dir: str) -> dict:
    spec, speech, portraits = item
    return render_video(spec, speech, portraits, Path(out_dir))


def _prepare_out(out_dir: Path) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.csv").exists():
        raise McdmError(f"{out_dir} exists, is not empty and holds no manifest.csv: refusing to replace it")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "truth").mkdir(parents=True)
    (tmp / "identities").mkdir()
    return tmp


def write_identities(portraits: dict[str, Portrait], folder: Path) -> None:
    rows = []
    for name, p in portraits.items():
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(p.image, cv2.COLOR_RGB2BGR))
        rows.append(dict(identity=name, source=RECIPES[name]["base"], recipe=p.recipe))
    pd.DataFrame(rows).to_csv(folder / "identities.csv", index=False)


def generate_sample(out_dir: str | os.PathLike, sample: SampleParams, workers: int = 2,
                    dask_address: str | None = None) -> pd.DataFrame:
    """Write the sample dataset to ``out_dir`` (replacing an earlier one) and return the manifest.

    Speech is synthesised first, in one fresh process (reproducible audio); the videos are then
    rendered in parallel with :func:`mcdm.data.parallel.map_videos` (a Dask LocalCluster of
    ``workers`` processes, or the scheduler at ``dask_address``), longest first.
    """
    out_dir = Path(out_dir)
    specs = plan_videos(sample)
    portraits = build_identities(sample.size, list(RECIPES)[: sample.n_identities])
    tmp = _prepare_out(out_dir)
    try:
        write_identities(portraits, tmp / "identities")
        speeches = synthesize_fresh([speech_request(s) for s in specs])
        items = [(s, sp, {name: portraits[name] for name in s.identities}) for s, sp in zip(specs, speeches)]
        rows = map_videos(partial(_render_item, out_dir=str(tmp.resolve())), items, workers=workers,
                          address=dask_address, desc="sample videos",
                          cost=lambda item: item[0].duration * len(item[0].identities))
        for spec, row in zip(specs, rows):
            if isinstance(row, Crashed):
                raise McdmError(f"sample video {spec.video_id} ({spec.kind}) failed: {row.reason}")
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("video_id").reset_index(drop=True)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The manifest with its columns typed (empty cells as NaN / '')."""
    m = pd.read_csv(Path(out_dir) / "manifest.csv", keep_default_na=False,
                    dtype={"defects": str, "scene_cuts": str, "identity": str, "text": str})
    for col in ("no_face_start", "no_face_end"):
        m[col] = pd.to_numeric(m[col].replace("", np.nan))
    m["long_term"] = m["long_term"].astype(str).str.lower() == "true"
    return m

