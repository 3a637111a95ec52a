"""split: deterministic 9:1 by source group, long-term videos in test, open set held out entirely."""
from __future__ import annotations

import pandas as pd
import pytest

from mcdm.config import Params
from mcdm.data.split import clip_roles, split, split_clips
from mcdm.errors import McdmError
from mcdm.train.syncnet import syncnet_folds

LANGS = ["en", "fr", "ja", "ar", "de"]


def clips_table(n_ids: int = 20, per_id: int = 5, long_ids: tuple[int, ...] = (3,)) -> pd.DataFrame:
    rows = []
    for i in range(n_ids):
        for j in range(per_id):
            rows.append({"clip_id": f"id{i:02d}_v{j}_000", "video_id": f"id{i:02d}_v{j}", "source_id": f"id{i:02d}",
                         "file": f"id{i:02d}_v{j}.mp4", "n_frames": 100, "duration": 4.0, "crop_path": f"c/id{i:02d}_v{j}.mp4",
                         "long_term": False, "language": LANGS[i % len(LANGS)]})
        if i in long_ids:
            rows.append({"clip_id": f"id{i:02d}_long_000", "video_id": f"id{i:02d}_long", "source_id": f"id{i:02d}",
                         "file": f"id{i:02d}_long.mp4", "n_frames": 1500, "duration": 60.0,
                         "crop_path": f"c/id{i:02d}_long.mp4", "long_term": True, "language": LANGS[i % len(LANGS)]})
    return pd.DataFrame(rows)


def test_groups_never_cross_and_test_is_about_a_tenth():
    clips = clips_table()
    train, test, open_set = split_clips(clips, Params())
    regular_test = test[~test.long_term]
    g_train, g_test, g_open = set(train.source_id), set(regular_test.source_id), set(open_set.source_id)
    assert not (g_train & g_test) and not (g_open & (g_train | g_test | set(test.source_id)))
    assert not (set(train.video_id) & set(test.video_id))  # never one source video on both sides
    assert len(g_open) == Params().data.split.open_set_identities == 2
    regular = len(clips) - clips.long_term.sum() - len(open_set)
    n_test_regular = (~test.long_term).sum()
    assert 0.1 * regular <= n_test_regular <= 0.1 * regular + 5  # groups of 5 clips: at most one group over
    assert set(train.clip_id) | set(test.clip_id) | set(open_set.clip_id) == set(clips.clip_id)  # nothing lost


def test_long_term_videos_go_to_test_and_never_to_the_open_set():
    clips = clips_table(long_ids=(3, 11))
    train, test, open_set = split_clips(clips, Params())
    assert set(clips.loc[clips.long_term, "clip_id"]) <= set(test.clip_id)
    assert not train.long_term.any() and not {"id03", "id11"} & set(open_set.source_id)


def test_identities_shared_across_source_ids_stay_on_one_side():
    clips = clips_table(n_ids=12, long_ids=())
    # a scene-cut video holding id01 and id02 links them; so does a two-person id02;id05 video
    extra = [{**clips.iloc[0].to_dict(), "clip_id": "cut_000", "video_id": "cut", "file": "cut.mp4", "source_id": "id01;id02"},
             {**clips.iloc[0].to_dict(), "clip_id": "pair_000", "video_id": "pair", "file": "pair.mp4", "source_id": "id05;id02"}]
    clips = pd.concat([clips, pd.DataFrame(extra)], ignore_index=True)
    for seed in range(6):
        p = Params()
        p.data.split.seed = seed
        sides = [set(df.source_id) for df in split_clips(clips, p)]
        linked = {"id01", "id02", "id05", "id01;id02", "id05;id02"}
        assert sum(bool(side & linked) for side in sides) == 1, seed


def test_split_is_deterministic_and_independent_of_row_order():
    clips = clips_table()
    a = split_clips(clips, Params())
    b = split_clips(clips.sample(frac=1.0, random_state=7), Params())
    for x, y in zip(a, b):
        assert sorted(x.clip_id) == sorted(y.clip_id)
    p = Params()
    p.data.split.seed = 1
    c = split_clips(clips, p)
    assert sorted(c[1].clip_id) != sorted(a[1].clip_id)  # the salt changes the draw


def test_open_set_pairs_portraits_with_held_out_audio_of_other_languages():
    clips = clips_table()
    train, test, open_set = split_clips(clips, Params())
    assert len(open_set) == 10  # every clip of the 2 held-out identities is a portrait row
    assert set(open_set.audio_clip_id) <= set(test.clip_id) - set(test.loc[test.long_term, "clip_id"])
    assert not set(open_set.audio_clip_id) & set(train.clip_id)
    assert open_set.cross_language.all() and (open_set.language != open_set.audio_language).all()
    assert open_set.audio_language.nunique() >= 2  # languages taken in turn
    assert (open_set.audio_source_id != open_set.source_id).all()


def test_too_few_groups_is_a_one_line_error():
    with pytest.raises(McdmError, match="split: 3 source groups"):
        split_clips(clips_table(n_ids=3, long_ids=()), Params())


def test_split_writes_three_tables(tmp_path):
    clips_table().to_parquet(tmp_path / "kept.parquet")
    train, test, open_set, summary = split(tmp_path / "kept.parquet", tmp_path / "split", Params())
    for name, df in (("train", train), ("test", test), ("open_set", open_set)):
        assert pd.read_parquet(tmp_path / "split" / f"{name}.parquet").shape == df.shape
    assert list(pd.read_csv(tmp_path / "split" / "rejects.csv").columns) == ["file", "stage", "reason"]
    assert summary.extra["test"]["long_term_clips"] == 1 and summary.extra["open_set"]["groups"] == 2


# ---------------------------------------------------------------------------------------- roles before the filter
def test_roles_are_decided_on_the_clips_before_the_sync_filter():
    candidates = clips_table()
    _, test_all, _ = split_clips(candidates, Params())
    # the filter drops every clip of a test group but one, and half of the training clips: a split deciding on
    # what is left could move groups across; deciding on the candidates keeps every group on its side
    keep = set(test_all.clip_id[::5]) | set(candidates.clip_id[::2])
    filtered = candidates[candidates.clip_id.isin(keep)]
    train, test, open_set = split_clips(filtered, Params(), candidates=candidates)
    roles = clip_roles(candidates, Params()).set_index("clip_id")["role"]
    assert (roles[list(train.clip_id)] == "train").all() and (roles[list(test.clip_id)] == "test").all()
    assert (roles[list(open_set.clip_id)] == "open_set").all()
    with pytest.raises(McdmError, match="not among the candidate clips"):
        split_clips(clips_table(n_ids=21), Params(), candidates=candidates)


def test_syncnet_folds_keep_the_metric_syncnet_on_the_training_split():
    clips = clips_table()
    folds = syncnet_folds(clips, Params()).set_index("clip_id")
    train, test, open_set = split_clips(clips, Params())
    assert set(folds.index[folds["fold"] == "metric"]) == set(train.clip_id)
    assert set(folds.index[folds["fold"] == "cross_fit"]) == set(test.clip_id) | set(open_set.clip_id)
    metric_groups = set(folds.loc[folds["fold"] == "metric", "group"])
    assert not metric_groups & set(test[~test.long_term].source_id) and not metric_groups & set(open_set.source_id)


def test_micro_syncnet_never_trained_on_a_test_or_open_set_clip(micro_pipeline):
    """Issue #19 item 4: the SyncNet behind Sync-C / Sync-D and the test / open-set tables are disjoint
    (by clip; by identity group for the regular test clips and the open set)."""
    root = micro_pipeline
    trained = pd.read_csv(root / "models" / "syncnet" / "training_clips.csv")
    metric = trained[trained["fold"] == "metric"]
    seen = set(metric.loc[metric["use"] == "trained", "clip_id"])
    test = pd.read_parquet(root / "data" / "split" / "test.parquet")
    open_set = pd.read_parquet(root / "data" / "split" / "open_set.parquet")
    assert seen and not seen & set(test.clip_id) and not seen & set(open_set.clip_id)
    group = dict(zip(trained["clip_id"], trained["group"]))  # every face-filtered clip's identity group
    held = set(test.loc[~test.long_term.astype(bool), "clip_id"]) | set(open_set.clip_id)
    assert not set(metric["group"]) & {group[c] for c in held}
    # every clip the sync filter kept was scored by the SyncNet that did not train on it
    scores = pd.read_csv(root / "data" / "sync" / "scores.csv")
    by = dict(zip(scores["clip_id"], scores["scored_by"]))
    assert all(by[c] == ("cross_fit" if f == "metric" else ".") for c, f in zip(trained["clip_id"], trained["fold"])
               if c in by)
