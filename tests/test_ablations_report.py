"""The ablation matrix, the alpha sweep and the report (decisions.md #10, #16, #23).

Unit tests: which stages a member retrains (and that this agrees with the stages' own SHARED_STAGE1),
its params, the pipeline folders it assembles, members never being the main line, and the report's
maths (mean ± sample std over seeds, the paper's ordering line, missing inputs listed) on hand-made
metrics files. Integration tests on the session's micro pipeline (``micro_pipeline``): every matrix
member exists and retrained only its stages, no member registered a model version, the report holds
the members' numbers. (`dvc exp run -S alpha=0.5` re-running only stage 3, evaluate and the report is
checked where the README runs it, in tests/test_readme.py.)
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hand_made_evaluations import build

from mcdm.config import Params, load_params
from mcdm.eval import report
from mcdm.eval.claims_report import write_claims
from mcdm.eval.metric_files import HEADLINE
from mcdm.experiments import ablate
from mcdm.tracking import runs as tracking
from mcdm.train.stages.denoiser_stages import SHARED_STAGE1


# ---------------------------------------------------------------------------------------- members
@pytest.mark.parametrize("variant, kind, stages", [
    ("wo_mta", "ablation", (3,)), ("wo_fpc", "ablation", (2, 3)), ("wo_fa", "ablation", (1, 2, 3)),
    ("b1", "ablation", (1, 2, 3)), ("b2", "ablation", (1, 2, 3)), ("full", "ablation", (1, 2, 3)),
    ("full", "sweep", (3,)), ("wo_mta", "sweep", (3,)), ("wo_fpc", "sweep", (2, 3)),
])
def test_member_retrains_only_the_stages_its_variant_changes(variant, kind, stages):
    assert ablate.member_stages(variant, kind) == stages


def test_stage_one_is_retrained_exactly_when_the_stages_do_not_share_it():
    for variant in ablate.VARIANT_STAGES:
        if variant != "full":
            assert (1 in ablate.member_stages(variant, "ablation")) == (variant not in SHARED_STAGE1), variant


def test_member_params_scale_steps_and_set_variant_seed_alpha():
    params = Params.model_validate({"ablations": {"steps_fraction": 0.25, "alpha": 0.3},
                                    "train": {"stage1": {"steps": 10, "warmup_steps": 4}, "stage3": {"steps": 2}}})
    mp = ablate.member_params(params, "wo_fa", 7, None)
    assert (mp.variant, mp.seed, mp.alpha) == ("wo_fa", 7, 0.3)  # ablation members run at ablations.alpha
    assert (mp.train.stage1.steps, mp.train.stage1.warmup_steps, mp.train.stage3.steps) == (2, 1, 1)  # >= 1 step
    assert mp.train.stage2.steps == round(Params().train.stage2.steps * 0.25)
    sweep = ablate.member_params(params, "full", 0, 0.9)
    assert sweep.alpha == 0.9  # a sweep member at its own alpha
    # ablation and sweep members alike are measured with ablations.eval over eval, long-term clips included
    for member in (mp, sweep):
        assert member.eval.long_term_seconds == params.ablations.eval["long_term_seconds"] >= 30
        assert member.eval.long_term_clips == params.ablations.eval["long_term_clips"]
    assert params.variant == "full" and params.train.stage1.steps == 10  # the main line's params untouched


def test_pipeline_takes_the_retrained_components_from_the_member(tmp_path):
    models, out = tmp_path / "models", tmp_path / "models" / "ablations" / "m"
    for variant, components in [("wo_mta", {"denoiser"}),
                                ("wo_fpc", {"denoiser", "motion_prior", "audio_tokens"}),
                                ("wo_fa", {"denoiser", "motion_prior", "audio_tokens", "landmark_guider"})]:
        folders = ablate.stage_folders(models, out, ablate.member_stages(variant, "ablation"))
        overrides = ablate.pipeline_overrides(folders, models)
        assert set(overrides) == components, variant
        assert overrides["denoiser"] == out / "stage3" / "denoiser"


def test_members_are_never_the_main_line(monkeypatch):
    monkeypatch.delenv(tracking.MEMBER_ENV, raising=False)
    params = Params()
    assert tracking.is_main_line(params)
    with tracking.ablation_member("full-s0"):
        assert not tracking.is_main_line(params)  # variant full at the default alpha, but a member
        assert tracking.run_tags(params, "train_stage3")["ablation_member"] == "full-s0"
        member = tracking.run_name(params, "evaluate")
    with tracking.ablation_member("alpha-0.1", "sweep"):
        sweep = tracking.run_name(params, "evaluate")
        assert tracking.run_tags(params, "x")["member_kind"] == "sweep"
    assert tracking.is_main_line(params) and "ablation_member" not in tracking.run_tags(params, "x")
    # MLflow's run table tells the three apart by name (a full member trains the main line's variant)
    main = tracking.run_name(params, "evaluate")
    assert main == "evaluate [main line: full alpha=0.1 seed=0]"
    assert member == "evaluate [ablation full-s0: full alpha=0.1 seed=0]"
    assert sweep == "evaluate [sweep alpha-0.1: full alpha=0.1 seed=0]"


# ---------------------------------------------------------------------------------------- report maths
def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    """reports/ of tests/hand_made_evaluations.py (a main line, five variants x 3 seeds, three alphas; no b2),
    the claims stage run on them, a stale member folder, SyncNet's metrics, one training report."""
    tmp_path = tmp_path_factory.mktemp("report")
    reports, params = build(tmp_path)
    _write(reports / "ablations" / "stale-s9" / "metrics_details.json",
           {"member": {"name": "stale-s9", "kind": "ablation", "variant": "wo_fa", "seed": 9, "alpha": 0.1,
                       "retrained_stages": [1, 2, 3]}})
    write_claims(reports, reports / "ablations", params, reports)
    _write(reports / "train_stage1.json", {"stage": 1, "variant": "full", "steps": 8, "loss_first10": 0.9,
                                           "loss_last10": 0.5, "wall_s": 12.0})
    _write(reports / "data_pipeline.json", {"stages": {"sync": {"kept": 8, "rejected_total": 1,
                                                                "rejected": {"av_offset": 1}, "seconds": 40.0}}})
    _write(tmp_path / "syncnet.json", {"train_clips": 20, "heldout_clips": 3, "planted_out_of_sync_in_train": 2,
                                       "planted_out_of_sync_in_table": 3, "folds": {"metric": {"groups": 6},
                                       "cross_fit": {"clips": 9, "groups": 4}}, "cross_fit": {}})
    done = report.write_report(params, reports / "metrics_details.json", reports / "ablations",
                               [reports / f"train_stage{k}.json" for k in (1, 2)], reports / "data_pipeline.json",
                               reports, reports / "long_term.png", claims=reports / "claims.json",
                               syncnet=tmp_path / "syncnet.json")
    return reports, done


def test_report_tables_hold_the_claims_intervals_and_no_paper_value(hand_made):
    reports, done = hand_made
    table = pd.read_csv(reports / "ablations.csv").set_index("variant")
    assert list(table.index) == ["full", "wo_fa", "wo_fpc", "wo_mta", "b1"]  # params order; b2 has no member
    units = [0.30 + 0.05 * c + 0.01 * s for c in range(4) for s in range(3)]  # full's SSIM per (clip, seed)
    assert table.loc["full", "ssim_mean"] == pytest.approx(np.mean(units))
    assert table.loc["full", "ssim_low"] < table.loc["full", "ssim_mean"] < table.loc["full", "ssim_high"]
    assert table.loc["wo_fpc", "fid_mean"] == pytest.approx(0.25) and table.loc["full", "fid_mean"] == pytest.approx(0.0)
    assert math.isnan(table.loc["full", "fid_low"])  # a pooled set metric: its intervals are the claims' differences
    md = (reports / "ablations.md").read_text()
    ours, paper = md.split("## The paper's numbers")
    assert "42.08" not in ours and "42.08" in paper  # never in a cell beside ours
    text = (reports / "report.md").read_text()
    main_table = text[text.index("## The main line"):text.index("## The paper's numbers")]
    assert "42.08" not in main_table and "656.7" not in main_table
    assert "| full > wo_mta > wo_fpc > wo_fa on SSIM | holds | refuted |" in text  # wo_fa beats full by 0.02
    assert "[claims.md](claims.md) answers" in text and "![paired effects with their intervals](claims_effects.png)" in text
    assert "2 planted out-of-sync clips (of 3 in the face-filtered table) were among its training clips" in text
    sweep = pd.read_csv(reports / "alpha_sweep.csv")
    assert list(sweep["alpha"]) == [0.1, 0.5, 0.9]
    assert sweep["ssim_mean"].tolist() == pytest.approx([0.375 + 0.3 - 0.1 * a for a in (0.1, 0.5, 0.9)])
    for name in report.OUTPUTS:
        assert (reports / name).is_file(), name


def test_report_lists_missing_inputs_and_invents_nothing(hand_made):
    reports, done = hand_made
    text = (reports / "report.md").read_text()
    assert f"`{reports / 'train_stage2.json'}`: MISSING" in text
    assert f"`{reports / 'long_term.png'}`: MISSING" in text
    assert all(f"missing ablation member variant=b2 seed={s}" in text for s in range(3))
    assert "stale-s9" in text and "ignored" in text  # a folder outside the matrix is not averaged in
    assert "params hash `h0`" in text
    assert len(done["missing"]) == 2 + 3  # two files, three members


# ---------------------------------------------------------------------------------------- micro pipeline
def _member_dirs(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in (root / "reports" / "ablations").glob("*/metrics_details.json")}


def test_micro_matrix_members_retrained_only_their_stages(micro_pipeline):
    root = micro_pipeline
    params = load_params(root / "params.yaml")
    members = _member_dirs(root)
    expected = {(v, s) for v in params.ablations.variants for s in params.ablations.seeds}
    got = {(m["member"]["variant"], m["member"]["seed"]) for m in members.values() if m["member"]["kind"] == "ablation"}
    assert got == expected
    alphas = sorted(m["member"]["alpha"] for m in members.values() if m["member"]["kind"] == "sweep")
    assert alphas == sorted(params.sweep.alphas)
    for name, m in members.items():
        info = m["member"]
        stages = ablate.member_stages(info["variant"], info["kind"])
        assert info["retrained_stages"] == list(stages), name
        folder = root / "models" / "ablations" / name
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith("stage")) == [f"stage{k}" for k in stages]
        assert m["variant"] == info["variant"] and m["alpha"] == pytest.approx(info["alpha"])
        for k in stages:
            stage = json.loads((folder / f"stage{k}" / "stage.json").read_text())
            assert (stage["variant"], stage["seed"]) == (info["variant"], info["seed"])
            steps = ablate.scaled_steps(getattr(params.train, f"stage{k}").steps, params.ablations.steps_fraction)
            assert info["steps"][f"stage{k}"] == steps
            # wo_fpc's stage 2 fits its audio tokens' statistics: no optimizer step
            assert stage["steps"] == (0 if (info["variant"], k) == ("wo_fpc", 2) else steps), (name, k)
        # every member, ablation or sweep, is measured on the long-term clips, per window (Figures 5 and 7)
        folder = root / "reports" / "ablations" / name
        assert (folder / "long_term.csv").is_file() and (folder / "long_term_windows.csv").is_file(), name
        assert m.get("ssim") is not None and m.get("long_term") is not None, name
        assert m["long_term"]["seconds"] == pytest.approx(params.ablations.eval["long_term_seconds"], abs=0.05), name
        headline = json.loads((folder / "metrics.json").read_text())  # the DVC metric: small
        assert set(headline) == {*HEADLINE, "fallback"} and (folder / "features.npz").is_file()


def test_micro_members_never_registered_a_model_version(micro_pipeline):
    from mlflow import MlflowClient

    uri = tracking.default_tracking_uri(micro_pipeline)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    params = load_params(micro_pipeline / "params.yaml")
    members = client.search_runs([client.get_experiment_by_name(params.tracking.experiment).experiment_id],
                                 filter_string="tags.ablation_member != ''")
    assert {r.data.tags["ablation_member"] for r in members} == set(_member_dirs(micro_pipeline))
    assert not [r for r in members if "registered_version" in r.data.tags]
    versions = client.search_model_versions(f"name='{params.registry.name}'")
    member_runs = {r.info.run_id for r in members}
    assert versions and not [v for v in versions if v.run_id in member_runs]


def test_micro_report_holds_the_members_numbers(micro_pipeline):
    root = micro_pipeline
    reports = root / "reports"
    for name in report.OUTPUTS:
        assert (reports / name).is_file(), name
    table = pd.read_csv(reports / "ablations.csv").set_index("variant")
    for metric in ("ssim", "sync_c"):  # per-clip metrics: the mean over the members' (clip, seed) units
        for variant in table.index:
            units = pd.concat(pd.read_csv(root / "reports" / "ablations" / f"{variant}-s{s}" / "eval_clips.csv")[metric]
                              for s in load_params(root / "params.yaml").ablations.seeds)
            assert table.loc[variant, f"{metric}_mean"] == pytest.approx(units.mean()), (variant, metric)
    sweep = pd.read_csv(reports / "alpha_sweep.csv")
    by_alpha = {m["member"]["alpha"]: m["ssim"] for m in _member_dirs(root).values() if m["member"]["kind"] == "sweep"}
    assert dict(zip(sweep["alpha"], sweep["ssim_mean"])) == pytest.approx(by_alpha)
    text = (reports / "report.md").read_text()
    main = json.loads((reports / "metrics_details.json").read_text())
    assert f"`{main['params_hash']}`" in text and f"`{main['fvd_backend']}`" in text
    assert "MISSING" not in text and "missing ablation member" not in text
    assert re.search(r"\| full > wo_mta > wo_fpc > wo_fa on FVD \| holds \| (supported|refuted|inconclusive) \|", text)
    claims = json.loads((reports / "claims.json").read_text())
    assert {r["verdict"] for r in claims["claims"]} <= {"supported", "refuted", "inconclusive"}
    assert (reports / "claims.md").is_file() and (reports / "claims_effects.png").is_file()


# `dvc exp run -S alpha=0.5` re-running only train_stage3, evaluate and report, and `dvc exp show`
# listing it, are checked where the README runs that command: tests/test_readme.py (CLAIMS).
