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

from mcdm.config import Params, load_params
from mcdm.eval import ablation_tables, report
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
    assert sweep.eval.long_term_clips == 0 and mp.eval.long_term_clips == params.eval.long_term_clips  # curves: ablation only
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
    assert tracking.is_main_line(params) and "ablation_member" not in tracking.run_tags(params, "x")


# ---------------------------------------------------------------------------------------- report maths
def test_mean_and_sample_std_over_seeds():
    mean, std, n = ablation_tables.mean_std([1.0, 2.0, 4.0])
    assert (mean, n) == (pytest.approx(7 / 3), 3)
    assert std == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert ablation_tables.mean_std([5.0]) == (5.0, None, 1)  # one seed: no spread to report
    assert ablation_tables.mean_std([None, float("nan")]) == (None, None, 0)


def test_ordering_line_says_whether_the_papers_order_holds():
    fid = ablation_tables.METRICS[0]
    ssim = next(m for m in ablation_tables.METRICS if m.key == "ssim")
    holds = {"full": 1.0, "wo_mta": 2.0, "wo_fpc": 3.0, "wo_fa": 4.0}
    assert ablation_tables.ordering(holds, fid)["holds"] is True  # lower FID is better
    assert ablation_tables.ordering(holds, ssim)["holds"] is False  # higher SSIM is better: reversed
    assert ablation_tables.ordering({**holds, "wo_mta": 1.0}, fid)["holds"] is False  # a tie is not "better"
    missing = ablation_tables.ordering({"full": 1.0, "wo_fa": 2.0}, fid)
    assert missing["holds"] is None and missing["missing"] == ["wo_mta", "wo_fpc"]
    rows = [{"variant": v, "fid_mean": x} for v, x in {"full": 3.0, "wo_mta": 1.0, "wo_fpc": 2.0, "wo_fa": 4.0}.items()]
    line = ablation_tables.ordering_line(rows, fid)
    assert "does not hold" in line and "wo_mta > wo_fpc > full > wo_fa" in line
    tied = ablation_tables.ordering_line([{"variant": v, "fid_mean": 1.0} for v in ablation_tables.PAPER_ORDER], fid)
    assert "does not hold" in tied and "full = wo_mta = wo_fpc = wo_fa" in tied
    for variant, paper in ablation_tables.PAPER_VARIANTS.items():  # the constants are the paper's: its order holds
        assert set(paper) == {m.key for m in ablation_tables.METRICS}, variant
    for m in ablation_tables.METRICS:
        assert ablation_tables.ordering({v: ablation_tables.PAPER_VARIANTS[v][m.key] for v in ablation_tables.PAPER_ORDER}, m)["holds"], m.key


def _member(variant: str, seed: int, alpha=None, **values) -> dict:
    kind = "ablation" if alpha is None else "sweep"
    name = f"{variant}-s{seed}" if alpha is None else f"alpha-{alpha}"
    metrics = {m.key: values.get(m.key, 1.0) for m in (*ablation_tables.METRICS, ablation_tables.IDENTITY)}
    metrics.update({f"{m.key}_backend": f"backend-{m.key}" for m in (*ablation_tables.METRICS, ablation_tables.IDENTITY)})
    stages = ablate.member_stages(variant, kind)
    metrics.update({"params_hash": f"hash-{name}", "variant": variant,
                    "long_term": {"identity_drift": values.get("drift", 0.0)},
                    "member": {"name": name, "kind": kind, "variant": variant, "seed": seed,
                               "alpha": 0.1 if alpha is None else alpha, "retrained_stages": list(stages),
                               "wall_s": 3.0}})
    return metrics


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def hand_made(tmp_path):
    """reports/ with a main line, members of four variants x 2 seeds (b1, b2 missing), three alphas."""
    reports = tmp_path / "reports"
    fids = {"full": (10.0, 12.0), "wo_mta": (13.0, 14.0), "wo_fpc": (15.0, 15.5), "wo_fa": (20.0, 22.0)}
    for variant, values in fids.items():
        for seed, fid in enumerate(values):
            _write(reports / "ablations" / f"{variant}-s{seed}" / "metrics.json",
                   _member(variant, seed, fid=fid, ssim=0.5 - fid / 100, drift=fid / 100))
    for alpha, ssim in [(0.1, 0.6), (0.5, 0.5), (0.9, 0.3)]:
        _write(reports / "ablations" / f"alpha-{alpha}" / "metrics.json", _member("full", 0, alpha, ssim=ssim))
    _write(reports / "ablations" / "stale-s9" / "metrics.json", _member("wo_fa", 9))
    main = _member("full", 0)
    main.pop("member")
    parts = {"appearance": 0.2, "motion": 2.1, "mean_signals": 0.03, "frame_change": 0.4}
    main.update({f"fvd_part_{k}": v for k, v in parts.items()})
    main.update(fid=9.0, checks={"fvd_beats_static_reference": True},
                baselines={"static_reference": {"fid": 50.0, "fvd_part_motion": 3.9}},
                long_term={"seconds": 4.0, "clips": ["c"], "ssim_first": 0.5, "ssim_last": 0.4, "identity_drift": 0.01})
    _write(reports / "metrics.json", main)
    _write(reports / "train_stage1.json", {"stage": 1, "variant": "full", "steps": 8, "loss_first10": 0.9,
                                           "loss_last10": 0.5, "wall_s": 12.0})
    _write(reports / "data_pipeline.json", {"stages": {"sync": {"kept": 8, "rejected_total": 1,
                                                                "rejected": {"av_offset": 1}, "seconds": 40.0}}})
    params = Params.model_validate({"ablations": {"seeds": [0, 1]}, "sweep": {"alphas": [0.1, 0.5, 0.9]}})
    done = report.write_report(params, reports / "metrics.json", reports / "ablations",
                               [reports / f"train_stage{k}.json" for k in (1, 2)], reports / "data_pipeline.json",
                               reports, reports / "long_term.png")
    return reports, fids, done


def test_report_tables_hold_mean_and_std_over_seeds(hand_made):
    reports, fids, done = hand_made
    table = pd.read_csv(reports / "ablations.csv").set_index("variant")
    assert list(table.index) == ["full", "wo_fa", "wo_fpc", "wo_mta"]  # params order; b1, b2 have no member
    for variant, values in fids.items():
        assert table.loc[variant, "fid_mean"] == pytest.approx(np.mean(values))
        assert table.loc[variant, "fid_std"] == pytest.approx(np.std(values, ddof=1))
        assert table.loc[variant, "fid_backend"] == "backend-fid"
        assert table.loc[variant, "paper_fid"] == ablation_tables.PAPER_VARIANTS[variant]["fid"]
    md = (reports / "ablations.md").read_text()
    assert "11 ± 1.4 / 42.08" in md  # full: mean ± std / the paper's Table 4
    assert "- FID: the paper's ordering full > wo_mta > wo_fpc > wo_fa holds" in md
    assert "- SSIM: the paper's ordering full > wo_mta > wo_fpc > wo_fa holds" in md
    sweep = pd.read_csv(reports / "alpha_sweep.csv")
    assert list(sweep["alpha"]) == [0.1, 0.5, 0.9] and list(sweep["ssim"]) == [0.6, 0.5, 0.3]
    for name in report.OUTPUTS:
        assert (reports / name).is_file(), name


def test_report_lists_missing_inputs_and_invents_nothing(hand_made):
    reports, _, done = hand_made
    text = (reports / "report.md").read_text()
    assert f"`{reports / 'train_stage2.json'}`: MISSING" in text
    assert f"`{reports / 'long_term.png'}`: MISSING" in text
    for missing in ("variant=b1 seed=0", "variant=b1 seed=1", "variant=b2 seed=0", "variant=b2 seed=1"):
        assert f"missing ablation member {missing}" in text
    assert "stale-s9" in text and "ignored" in text  # a folder outside the matrix is not averaged in
    assert "| FID (↓) | 9 | `backend-fid` | 50 | n/a | n/a | 42.08 |" in text  # static, autoencoder, ground truth, paper
    assert "params hash `hash-full-s0`" in text
    # the FVD fallback by part, ours beside the baselines' (what a baseline lacks is n/a)
    assert "| motion | 2.1 | 3.9 | n/a |" in text and "| frame change | 0.4 | n/a | n/a |" in text
    assert "ours 0.6 at alpha 0.1 -> 0.3 at alpha 0.9, falls at every step" in text
    wo_mta_ssim = np.mean([0.5 - 0.13, 0.5 - 0.14])
    assert f"wo_mta level (mean of the wo_mta members): SSIM {ablation_tables.fmt(wo_mta_ssim)}" in text
    assert "decisions.md #20): yes" in text  # full's identity drift (0.11) <= wo_fa's (0.21)
    assert len(done["missing"]) == 2 + 4 + 0  # two files, four members


# ---------------------------------------------------------------------------------------- micro pipeline
def _member_dirs(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (root / "reports" / "ablations").glob("*/metrics.json")}


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
        # the long-term curve is the ablation members' (Figure 5 per variant); the sweep's plot is over alpha
        long_term = (root / "reports" / "ablations" / name / "long_term.csv").is_file()
        assert m.get("ssim") is not None and long_term == (info["kind"] == "ablation"), name
        assert (m.get("long_term") is not None) == (info["kind"] == "ablation"), name


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
    members = [m for m in _member_dirs(root).values() if m["member"]["kind"] == "ablation"]
    table = pd.read_csv(reports / "ablations.csv").set_index("variant")
    for metric in ("fvd", "ssim", "sync_c"):
        for variant in table.index:
            values = [m[metric] for m in members if m["member"]["variant"] == variant and m.get(metric) is not None]
            got = table.loc[variant, f"{metric}_mean"]
            if values:
                assert got == pytest.approx(np.mean(values)), (variant, metric)
            else:  # not computed for any seed (e.g. no face in the micro model's frames): empty, not invented
                assert math.isnan(got), (variant, metric)
    sweep = pd.read_csv(reports / "alpha_sweep.csv")
    by_alpha = {m["member"]["alpha"]: m["ssim"] for m in _member_dirs(root).values() if m["member"]["kind"] == "sweep"}
    assert dict(zip(sweep["alpha"], sweep["ssim"])) == pytest.approx(by_alpha)
    text = (reports / "report.md").read_text()
    main = json.loads((reports / "metrics.json").read_text())
    assert f"`{main['params_hash']}`" in text and f"`{main['fvd_backend']}`" in text
    assert "MISSING" not in text and "missing ablation member" not in text
    assert re.search(r"- FVD: (cannot say|the paper's ordering .* (holds|does not hold))", text)


# `dvc exp run -S alpha=0.5` re-running only train_stage3, evaluate and report, and `dvc exp show`
# listing it, are checked where the README runs that command: tests/test_readme.py (CLAIMS).
