"""The claims stage on hand-made evaluations whose effects are known: paired per-clip effects, set-level
Fréchet effects recomputed per resample, trends over alpha and long-term windows, each with its
interval, units and verdict; too few units stay inconclusive; claims.md / claims.json hold every claim."""
from __future__ import annotations

import json

import pytest
from hand_made_evaluations import SHIFT, build

from mcdm.eval import claims as C
from mcdm.eval.claim_inputs import load_evidence
from mcdm.eval.claims_report import OUTPUTS, write_claims


@pytest.fixture(scope="module")
def evidence(tmp_path_factory):
    return build(tmp_path_factory.mktemp("claims"))


def _row(result: dict, claim_id: str) -> dict:
    return next(r for r in result["claims"] if r["id"] == claim_id)


def test_paired_effects_intervals_units_and_verdicts(evidence):
    reports, params = evidence
    result = C.answer_all(load_evidence(reports, reports / "ablations", params), params)
    better = _row(result, "T4.ssim.full-wo_mta")
    assert better["effect"] == pytest.approx(0.05) and better["low"] == pytest.approx(0.05)
    assert better["high"] == pytest.approx(0.05) and better["verdict"] == "supported"
    assert (better["n_units"], better["n_clips"], better["n_seeds"]) == (12, 4, 3)
    assert better["frames_a"] == better["frames_b"] == 12 * 25
    assert "two-level" in better["method"]  # three seeds: seeds resampled, then clips within them
    worse = _row(result, "T4.ssim.full-wo_fa")
    assert worse["effect"] == pytest.approx(-0.02) and worse["verdict"] == "refuted"
    tie = _row(result, "T5.ssim.full-b1")
    assert tie["low"] < 0 < tie["high"] and tie["verdict"] == "inconclusive"
    assert tie["required_units"] is not None and tie["required_units"] > 0
    # an ordering combines its steps: one refuted step refutes it
    group = next(g for g in result["groups"] if g["id"] == "T4.order.ssim")
    assert group["verdict"] == "refuted" and group["members"][0] == "T4.ssim.full-wo_mta"
    # a variant with no member: not answered, said so
    missing = _row(result, "T5.ssim.full-b2")
    assert missing["effect"] is None and "no evaluation of b2" in missing["note"]


def test_set_level_effect_is_the_frechet_distance_recomputed_per_resample(evidence):
    reports, params = evidence
    result = C.answer_all(load_evidence(reports, reports / "ablations", params), params)
    fid = _row(result, "T4.fid.full-wo_fpc")
    # full's generated rows equal the real ones (d^2 = 0), wo_fpc's are shifted: d^2 = |shift|^2 on any resample
    assert fid["effect"] == pytest.approx(-float(SHIFT @ SHIFT), abs=1e-9)
    assert fid["low"] == pytest.approx(fid["effect"], abs=1e-9) and fid["high"] == pytest.approx(fid["effect"], abs=1e-9)
    assert fid["verdict"] == "supported" and fid["fallback"] and "set-level" in fid["method"]
    # the main line against its static reference (one seed: a flat bootstrap over the 4 clips)
    t3 = _row(result, "T3.sync_c")
    assert t3["effect"] == pytest.approx(0.05) and t3["n_units"] == 4 and "two-level" not in t3["method"]
    identity = _row(result, "T3.identity")  # model - ground truth = 0.1 on every clip: beyond the 0.05 margin
    assert identity["effect"] == pytest.approx(0.1) and identity["verdict"] == "refuted"


def test_long_term_and_trend_claims(evidence):
    reports, params = evidence
    result = C.answer_all(load_evidence(reports, reports / "ablations", params), params)
    decay = _row(result, "F5.ssim_decay.full-wo_fa")  # decay over 3 windows: 2 x 0.01 vs 2 x 0.05
    assert decay["effect"] == pytest.approx(-0.08) and decay["verdict"] == "supported"
    assert (decay["n_units"], decay["n_clips"], decay["n_seeds"]) == (6, 2, 3) and decay["frames_a"] == 6 * 3 * 125
    drift = _row(result, "F5.identity_drift.full-wo_fa")
    assert drift["effect"] == pytest.approx(-0.08) and drift["verdict"] == "supported"
    trend = _row(result, "F7.trend")  # SSIM = const - 0.1 alpha on every clip: the slope is exactly -0.1
    assert trend["effect"] == pytest.approx(-0.1) and trend["verdict"] == "supported" and trend["n_units"] == 4
    # the sweep has one seed: its long-term claims rest on 2 clips, below eval.claims.min_units
    long_trend = _row(result, "F7.trend.long")
    assert long_trend["n_units"] == 2 and long_trend["verdict"] == "inconclusive" and "min_units" in long_trend["note"]


def test_claims_stage_writes_markdown_json_and_pictures(evidence, tmp_path):
    reports, params = evidence
    result = write_claims(reports, reports / "ablations", params, tmp_path)
    for name in OUTPUTS:
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "claims.json").read_text())
    ids = {r["id"] for r in saved["claims"]}
    assert {"T3.sync_c", "T3.fvd", "T3.identity", "T4.fvd.full-wo_mta", "T5.efid.full-b2", "F5.identity_drift.full-wo_fa",
            "F7.trend", "F7.wo_mta-alpha0.9", "F7.alpha0.1-wo_mta", "F7.alpha0.5-wo_mta.long"} <= ids
    assert saved["arms"]["full"]["ssim"]["n"] == 12 and saved["windows"]["full"][0]["n"] == 6
    text = (tmp_path / "claims.md").read_text()
    assert "| full beats wo_mta on SSIM | SSIM (↑) | 0.05 (full - wo_mta) | [0.05, 0.05] | 12 (4 clips x 3 seeds" in text
    assert "**supported**" in text and "fallback `dlib-descriptor-128`" in text
    assert len(result["claims"]) == len(saved["claims"])
