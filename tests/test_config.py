"""The params schema: defaults live once, profiles validate, bad params fail in one line naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mcdm.config import (
    DATA_FILTERS,
    MOVED,
    PROFILES,
    DataParams,
    EvalParams,
    Params,
    ParamsError,
    dump_params,
    load_params,
    profile_params,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_yaml_is_the_schema_defaults():
    # params.yaml is written by `mcdm params apply default`: no default is written twice.
    assert load_params(ROOT / "params.yaml") == Params()
    assert (ROOT / "params.yaml").read_text() == dump_params(Params())


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates(profile):
    params = profile_params(profile, ROOT / "configs")
    assert isinstance(params, Params)


def test_paper_profile_has_paper_settings():
    p = profile_params("paper", ROOT / "configs")
    assert p.data.resolution == 512 and p.model.clip_frames == 16
    assert p.model.archived_frames == 16 and p.model.num_queries == 16 and p.model.prior_layers == 8
    assert p.train.stage1.lr == 1e-5 and p.train.stage3.steps == 30000 and p.train.stage2.batch_size == 4
    assert p.alpha == 0.1


@pytest.mark.parametrize(
    "raw, key, words",
    [
        ({"alpha": 1.5}, "alpha", "less than or equal to 1"),
        ({"alpha": -0.1}, "alpha", "greater than or equal to 0"),
        ({"variant": "wo_everything"}, "variant", "full"),
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"data": {"fps": "fast"}}, "data.fps", "number"),
        ({"train": {"stage2": {"stepz": 3}}}, "train.stage2.stepz", "unknown key"),
        ({"model": {"clip_frames": 1}}, "model.clip_frames", "greater than or equal to 2"),
    ],
)
def test_bad_params_fail_in_one_line_naming_the_key(raw, key, words):
    with pytest.raises(ParamsError) as err:
        validate(raw, "params.yaml")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"params.yaml: {key}: ")
    assert words in msg


@pytest.mark.parametrize("variant", ["full", "wo_fa", "wo_fpc", "wo_mta", "b1", "b2"])
def test_all_variants_accepted(variant):
    assert validate({"variant": variant}).variant == variant


def test_cli_reports_bad_params_as_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"alpha": 2}))
    proc = subprocess.run(
        [sys.executable, "-m", "mcdm.cli", "--params", str(bad), "params", "check"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "alpha" in lines[0], proc.stderr


def _old_layout(params: Params) -> dict:
    """``params`` as a params.yaml from before decisions.md #18's map (the five sections at top level)."""
    raw = params.model_dump(mode="json")
    for old, new in MOVED.items():
        section, key = new.split(".")
        raw[old] = raw[section].pop(key)
    return raw


@pytest.mark.parametrize("old", list(MOVED))
def test_a_moved_section_fails_in_one_line_naming_where_it_went(old):
    with pytest.raises(ParamsError) as err:
        validate({old: {}}, "params.yaml")
    assert str(err.value) == f"params.yaml: {old}: moved to {MOVED[old]} (decisions.md #18)"


def test_cli_reports_an_old_params_yaml_as_one_line_naming_every_move(tmp_path):
    old = tmp_path / "params.yaml"
    old.write_text(yaml.safe_dump(_old_layout(Params()), sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "mcdm.cli", "--params", str(old), "params", "check"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "extra inputs" not in lines[0] and "unknown key" not in lines[0], proc.stderr
    assert f"{old}: quality: moved to data.quality; " in lines[0] and lines[0].endswith(" (decisions.md #18)")
    for section, where in MOVED.items():
        assert f"{section}: moved to {where}" in lines[0]


def test_an_old_profile_overlay_fails_naming_the_move(tmp_path):
    (tmp_path / "micro.yaml").write_text("open_set:\n  max_pairs: 2\n")
    with pytest.raises(ParamsError, match=r"micro\.yaml: open_set: moved to eval\.open_set \(decisions.md #18\)$"):
        profile_params("micro", tmp_path)


def test_params_apply_micro_roundtrip(tmp_path):
    out = tmp_path / "params.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "mcdm.cli", "params", "apply", "micro", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert load_params(out) == profile_params("micro", ROOT / "configs")


def test_params_hash_changes_with_alpha():
    assert Params().hash() != validate({"alpha": 0.5}).hash()


# ---------------------------------------------------------------------------------------- dvc.yaml params
# Sub-sections that only their own stages read (decisions.md #18), and the one key of them other stages read.
OWN_STAGES = {"data.quality": {"quality"}, "data.syncnet": {"syncnet_train", "sync_filter"},
              "data.split": {"split", "syncnet_train"},  # syncnet_train decides the split's roles too (train/syncnet.py)
              "eval.open_set": {"open_set"}, "eval.token_figures": {"token_figures"}, "eval.claims": {"claims"}}
SHARED_KEYS = {"data.syncnet.max_offset": {"evaluate", "open_set", "ablation", "sweep"}}  # Sync-C / Sync-D's search
DATA_KEYS = {f"data.{k}" for k in DataParams.model_fields if k not in DATA_FILTERS}
EVAL_KEYS = {f"eval.{k}" for k in EvalParams.model_fields if k not in ("open_set", "token_figures", "claims")}


def _dvc_params() -> dict[str, list[str]]:
    """Each stage's params.yaml keys, as dvc.yaml lists them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        keys = []
        for entry in stage.get("params", []):
            if isinstance(entry, str):
                keys.append(entry)
            else:  # {file: [keys]}
                keys += [k for file, ks in entry.items() if file == "params.yaml" for k in ks]
        out[name] = keys
    return out


def _has(tree: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def test_every_dvc_params_entry_is_a_key_of_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = [f"{stage}: {key}" for stage, keys in _dvc_params().items() for key in keys if not _has(params, key)]
    assert not missing


def test_a_sub_section_is_a_dependency_of_its_own_stages_only():
    for stage, keys in _dvc_params().items():
        for key in keys:
            for sub, owners in OWN_STAGES.items():
                # a key inside the sub-section, or a section holding it (`data`, `eval`), depends on it
                reads = key == sub or key.startswith(f"{sub}.") or sub.startswith(f"{key}.")
                assert not reads or stage in owners or stage in SHARED_KEYS.get(key, ()), f"{stage}: {key}"
    params = _dvc_params()
    assert not [k for k in params["faces"] if k.startswith(("data.quality", "data.syncnet", "data.split"))]
    for stage, sub in (("quality", "data.quality"), ("syncnet_train", "data.syncnet"), ("sync_filter", "data.syncnet"),
                       ("split", "data.split"), ("open_set", "eval.open_set"), ("token_figures", "eval.token_figures"),
                       ("claims", "eval.claims")):
        assert sub in params[stage]


def test_stages_that_read_a_whole_section_list_all_its_other_keys():
    # faces and the stages after the main line read all of `data` and (but faces) `eval`; their lists must
    # grow with the schema, as the whole section they replace did
    params = _dvc_params()
    for stage in ("faces", "evaluate", "open_set", "ablation", "sweep"):
        assert {k for k in params[stage] if k.startswith("data.") and k.count(".") == 1} - set(OWN_STAGES) == DATA_KEYS, stage
    for stage in ("evaluate", "open_set", "ablation", "sweep"):
        assert {k for k in params[stage] if k.startswith("eval.") and k.count(".") == 1} - set(OWN_STAGES) == EVAL_KEYS, stage
