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


def test_stage_seconds_reads_a_timestamped_dvc_log():
    log = ("[    0.6] Running stage 'params_check':\n[    1.0] params.yaml: ok\n"
           "[    1.2] Running stage 'sample_data':\n[   27.7] sample videos: 100%\n"
           "[   28.4] Running stage 'evaluate':\n[   90.0]   fid 0.67\n[   91.5] real 1m31s\n")
    assert qa.stage_seconds(log) == {"params_check": 0.6, "sample_data": 27.2, "evaluate": 63.1}
    with pytest.raises(SystemExit, match="Running stage"):
        qa.stage_seconds("dvc repro without timestamps\n")


def test_an_end_to_end_run_is_recorded_from_the_files_the_pipeline_wrote(tmp_path):
    project = tmp_path / "proj"
    (project / "reports").mkdir(parents=True)
    (project / "models" / "base").mkdir(parents=True)
    (project / "params.yaml").write_text("alpha: 0.1\ndata:\n  source: data/sample\n  resolution: 128\n")
    targets = {"resolution": {"value": 128.0, "target": ">= 128", "met": True},
               "mouth_open_corr": {"value": 0.21, "target": ">= 0.5", "met": False, "low": 0.05, "high": 0.4}}
    (project / "reports" / "metrics_details.json").write_text(json.dumps(
        {"quality_targets": targets, "psnr": 17.25, "autoencoder_psnr_heldout": 26.0, "identity": 0.4,
         "identity_gt": 0.25, "n_clips": 5, "frames": 250, "seed": 0, "params_hash": "abc"}))
    for k in (1, 2, 3):
        (project / "reports" / f"train_stage{k}.json").write_text(json.dumps({"train_wall_s": 10.0 * k}))
    (project / "models" / "base" / "encoders.json").write_text(json.dumps({"seconds": 99.5}))
    log = tmp_path / "log"
    log.write_text("[    0.5] Running stage 'split':\n[   60.5] Running stage 'evaluate':\n[  120.5] EXIT\n")
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    assert qa.main(["--attempts", str(attempts), "--record-run", str(project), "--name", "e2e_q",
                    "--change", "quality profile", "--log", str(log)]) == 0
    attempt = json.loads((attempts / "e2e_q.json").read_text())
    assert attempt["kind"] == "end_to_end" and attempt["measured"]["resolution"] == 128
    assert attempt["measured"]["stage_wall_s"] == {"split": 60.0, "evaluate": 60.0}
    assert attempt["measured"]["train_wall_s"] == {"stage1": 10.0, "stage2": 20.0, "stage3": 30.0}
    row = qa.build(qa.load_attempts(attempts))["end_to_end"][0]
    assert row["main_line_min"] == 2.0 and row["targets_met"] == "1/2" and row["psnr_db"] == 17.2
    assert row["minutes_per_stage"] == "data 1.0, evaluate 1.0"  # split is a data stage
    assert row["resolution"] == "128 (met)" and row["mouth_open_corr"] == "0.21 [0.05, 0.4] (no)"
    assert row["identity_gap"] is None  # a target the run did not write stays empty, not guessed
