"""The params schema: defaults live once, profiles validate, bad params fail in one line naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mcdm.config import PROFILES, Params, ParamsError, dump_params, load_params, profile_params, validate

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
