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
    log.write_text("[    0.5] Running stage 'split':\n[   30.5] Running stage 'base_models':\n"
                   "[   60.5] Running stage 'evaluate':\n[  120.5] EXIT\n")
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    assert qa.main(["--attempts", str(attempts), "--record-run", str(project), "--name", "e2e_q",
                    "--change", "quality profile", "--log", str(log)]) == 0
    attempt = json.loads((attempts / "e2e_q.json").read_text())
    assert attempt["kind"] == "end_to_end" and attempt["measured"]["resolution"] == 128
    assert attempt["measured"]["stage_wall_s"] == {"split": 30.0, "base_models": 30.0, "evaluate": 60.0}
    assert attempt["measured"]["train_wall_s"] == {"stage1": 10.0, "stage2": 20.0, "stage3": 30.0}
    assert attempt["measured"]["eval_settings"] == qa.default_eval_settings()  # params.yaml sets no eval section
    row = qa.build(qa.load_attempts(attempts))["end_to_end"][0]
    assert row["main_line_min"] == 2.0 and row["targets_met"] == "1/2" and row["psnr_db"] == 17.2
    assert row["minutes_per_stage"] == "data 0.5, base_models 0.5, evaluate 1.0"  # split is a data stage
    assert row["resolution"] == "128 (met)" and row["mouth_open_corr"] == "0.21 [0.05, 0.4] (no)"
    assert row["identity_gap"] is None  # a target the run did not write stays empty, not guessed
    # a re-evaluate of finished models (only params_check and evaluate ran) is no main line
    log.write_text("[    1.8] Running stage 'params_check':\n[    4.4] Running stage 'evaluate':\n[  275.6] done\n")
    assert qa.main(["--attempts", str(attempts), "--record-run", str(project), "--name", "e2e_q",
                    "--change", "re-evaluate", "--log", str(log)]) == 0
    row = qa.build(qa.load_attempts(attempts))["end_to_end"][0]
    assert row["main_line_min"] is None and row["minutes_per_stage"] == "evaluate 4.5"


def test_reference_input_deltas_are_taken_within_one_latent_size(tmp_path):
    def attempt(name, latent, identity, baseline=False):
        m = {"latent": latent, "unet_steps": 600, "sample_identity": identity, "gt_identity": 0.2,
             "sample_no_face": 0, "n": 60}
        (tmp_path / f"{name}.json").write_text(json.dumps({"name": name, "kind": "reference_input", "change": name,
                                                          "machine": "2 cores, idle", "baseline": baseline,
                                                          "measured": m}))

    attempt("tok64", [4, 8, 8], 0.50, baseline=True)
    attempt("cat64", [4, 8, 8], 0.45)
    attempt("base128", [4, 32, 32], 0.60, baseline=True)
    attempt("cat128", [4, 32, 32], 0.40)
    rows = {r["attempt"]: r for r in qa.build(qa.load_attempts(tmp_path))["reference_input"]}
    assert rows["cat64"]["sample_identity_gap_delta"] == -0.05  # against tok64
    assert rows["cat128"]["sample_identity_gap_delta"] == -0.2  # against base128, not the 64 px baseline
    assert rows["tok64"]["sample_identity_gap_delta"] is None and rows["base128"]["sample_identity_gap_delta"] is None


def test_stage3_trend_keeps_the_runs_that_differ_in_stage3_steps_only(tmp_path):
    def run(name, resolution, steps, sync):
        targets = {"sync_c_fraction": {"value": sync, "target": ">= 0.5", "met": sync >= 0.5},
                   "mouth_open_corr": {"value": sync / 2, "target": ">= 0.5", "met": False, "low": 0.0, "high": 0.4}}
        return {"name": name, "kind": "end_to_end", "change": name, "machine": "2 cores, idle",
                "measured": {"resolution": resolution, "quality_targets": targets,
                             "train_steps": dict(zip(("stage1", "stage2", "stage3"), steps))}}

    attempts = [run("b", 128, (400, 600, 1320), 0.33), run("a", 128, (400, 600, 440), 0.23),
                run("other_stage1", 128, (800, 600, 2000), 0.9), run("at64", 64, (100, 150, 110), 0.27),
                {**run("no_steps", 128, (0, 0, 0), 0.1), "measured": {"resolution": 128, "quality_targets": {}}}]
    driven = run("driven", 128, (400, 600, 2640), 0.6)
    driven["measured"]["eval_settings"] = {**qa.default_eval_settings(), "use_landmarks": True}
    attempts.append(driven)  # a diagnostic evaluate, not a point of the trend
    points = qa.stage3_trend(attempts)
    assert [p["attempt"] for p in points] == ["a", "b"]  # by steps; other stage 1, 64 px, no steps, driven left out
    assert [p["stage3_steps"] for p in points] == [440, 1320] and points[1]["sync_c_fraction"]["value"] == 0.33
    png = qa.plot_stage3_trend(points, tmp_path / "trend.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
