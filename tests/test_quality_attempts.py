"""benchmarks/quality_attempts.py: the committed attempt files become the report's tables, every row
computed from its file (identity gaps, deltas against the kind's baseline, step-time ratios under the
same load), and the committed reports/quality_attempts.md is what the script writes today."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "benchmarks" / "quality_attempts"
qa = load_benchmark("quality_attempts")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa")
    assert qa.main(["--attempts", str(FOLDER), "--out", str(out)]) == 0
    return out


def test_every_attempt_file_is_a_row_of_its_kind(written):
    files = [json.loads(p.read_text()) for p in FOLDER.glob("*.json")]
    tables = json.loads((written / "quality_attempts.json").read_text())
    names = {r["attempt"] for rows in tables.values() for r in rows}
    assert names == {a["name"] for a in files}
    text = (written / "quality_attempts.md").read_text()
    for a in files:
        assert f"| {a['name']} | {a['change']} |" in text, a["name"]
    assert "shared" in text and "idle" in text  # the cores each row was measured on


def test_rows_are_computed_from_the_files(written):
    tables = json.loads((written / "quality_attempts.json").read_text())
    ae = {r["attempt"]: r for r in tables["autoencoder"]}
    raw = json.loads((FOLDER / "ae_B2_f4c4.json").read_text())["measured"]
    base = json.loads((FOLDER / "ae_R64_repo_vae.json").read_text())["measured"]
    assert ae["ae_B2_f4c4"]["ae_identity_gap"] == round(raw["ae_identity"] - raw["gt_identity"], 3)
    assert ae["ae_B2_f4c4"]["psnr_delta"] == round(raw["psnr_heldout"] - base["psnr_heldout"], 3)
    assert ae["ae_R64_repo_vae"]["psnr_delta"] is None  # the baseline
    assert list(ae)[0] == "ae_R64_repo_vae"  # the baseline row first
    steps = {(r["attempt"], r["stage"]): r for r in tables["step_time"]}
    c1 = json.loads((FOLDER / "step_C1_128_f8_idle.json").read_text())["measured"]["stage3"]["cpu_s_per_step"]
    c0 = json.loads((FOLDER / "step_C0_64_idle.json").read_text())["measured"]["stage3"]["cpu_s_per_step"]
    assert steps[("step_C1_128_f8_idle", "stage3")]["cpu_ratio_to_64px"] == round(c1 / c0, 2)  # idle against idle
    sync = {r["attempt"]: r for r in tables["lip_sync"]}
    m = json.loads((FOLDER / "sync_ceiling_128_B2.json").read_text())["measured"]
    assert sync["sync_ceiling_128_B2"]["autoencoder_fraction"] == round(m["autoencoder"]["sync_c"] / m["ground_truth"]["sync_c"], 3)


def test_committed_report_is_the_scripts_output(written):
    for name in ("quality_attempts.md", "quality_attempts.json"):
        assert (ROOT / "reports" / name).read_text() == (written / name).read_text(), name


def test_a_file_without_its_kind_is_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"name": "x", "kind": "guess", "change": "", "measured": {},
                                                 "machine": ""}))
    with pytest.raises(SystemExit, match="unknown kind"):
        qa.load_attempts(tmp_path)
