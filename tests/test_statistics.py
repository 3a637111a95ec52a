"""Statistical evidence for comparisons, pinned against hand computations and independent references
(scipy.stats.bootstrap, scipy's Wilson interval, np.polyfit, a Monte Carlo power check)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mcdm.errors import McdmError
from mcdm.eval.statistics import (
    Estimate,
    bootstrap_ci,
    conjunction,
    failure_rate,
    ordering_verdict,
    paired_difference,
    penalised,
    required_n,
    set_level_difference,
    trend_verdict,
    verdict,
)


def est(low: float, high: float) -> Estimate:
    return Estimate((low + high) / 2, low, high, 10, None, 0.95, "hand-made")


# ------------------------------------------------------------------------------------------------
# bootstrap_ci


def test_bootstrap_of_a_constant_is_a_point():
    e = bootstrap_ci(np.full(17, 0.7))
    assert e.value == pytest.approx(0.7) and e.low == e.high == e.value
    assert (e.n, e.n_groups, e.level) == (17, None, 0.95)
    assert set(e.to_dict()) == {"value", "low", "high", "n", "n_groups", "level", "method"}
    assert json.loads(json.dumps(e.to_dict()))["n"] == 17                # plain JSON types


def test_percentile_ci_agrees_with_scipy_bootstrap():
    x = np.random.default_rng(1).gamma(2.0, 1.5, size=40)
    for statistic in (np.mean, np.median):
        ours = bootstrap_ci(x, statistic, n_boot=4000, seed=3)
        ref = stats.bootstrap((x,), statistic, n_resamples=4000, method="percentile",
                              random_state=np.random.default_rng(4)).confidence_interval
        se = np.std(x, ddof=1) / math.sqrt(x.size)
        assert ours.value == pytest.approx(statistic(x))
        assert ours.low == pytest.approx(ref.low, abs=0.25 * se)
        assert ours.high == pytest.approx(ref.high, abs=0.25 * se)


def test_non_vectorised_statistic_gives_the_same_ci():
    x = np.random.default_rng(2).normal(size=25)
    fast = bootstrap_ci(x, np.mean, n_boot=500, seed=7)
    slow = bootstrap_ci(x, lambda v: float(np.mean(v)), n_boot=500, seed=7)   # no axis= keyword
    assert (slow.low, slow.high) == pytest.approx((fast.low, fast.high), abs=1e-12)


def test_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    for rep in range(200):
        e = bootstrap_ci(rng.normal(3.0, 2.0, size=30), n_boot=1000, seed=rep)
        hits += e.low <= 3.0 <= e.high
    assert 0.88 <= hits / 200 <= 0.99          # percentile CIs undercover a little at n = 30


def test_higher_level_gives_a_wider_ci():
    x = np.random.default_rng(5).normal(size=30)
    narrow, wide = bootstrap_ci(x, level=0.8), bootstrap_ci(x, level=0.99)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_two_level_bootstrap_equals_bootstrap_of_group_means_when_groups_are_constant():
    # Values constant within each group of equal size: the two-level resample mean is the mean of
    # G resampled group means, i.e. the flat bootstrap of the group means (scipy as reference).
    means = np.array([0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.8, 0.6])
    values, groups = np.repeat(means, 5), np.repeat(np.arange(8), 5)
    ours = bootstrap_ci(values, groups=groups, n_boot=4000, seed=1)
    ref = stats.bootstrap((means,), np.mean, n_resamples=4000, method="percentile",
                          random_state=np.random.default_rng(2)).confidence_interval
    assert ours.n_groups == 8 and "two-level" in ours.method
    assert ours.low == pytest.approx(ref.low, abs=0.02)
    assert ours.high == pytest.approx(ref.high, abs=0.02)


def test_two_level_ci_is_wider_than_flat_when_groups_differ():
    rng = np.random.default_rng(3)
    offsets = np.repeat([-1.0, 0.0, 1.0, 2.0], 25)                  # a strong seed effect
    values, groups = offsets + rng.normal(0, 0.1, size=100), np.repeat(["s0", "s1", "s2", "s3"], 25)
    flat, cluster = bootstrap_ci(values), bootstrap_ci(values, groups=groups)
    assert cluster.value == flat.value
    assert (cluster.high - cluster.low) > 4 * (flat.high - flat.low)


def test_two_level_resamples_within_groups_too():
    # Equal group means, all variation within groups: the first stage adds nothing, and the
    # second stage alone must give about the flat bootstrap's width (not a point).
    within = np.random.default_rng(4).normal(size=(4, 25))
    values = (within - within.mean(1, keepdims=True)).reshape(-1)         # (100,), group means 0
    flat, cluster = bootstrap_ci(values), bootstrap_ci(values, groups=np.repeat(np.arange(4), 25))
    assert 0.8 < (cluster.high - cluster.low) / (flat.high - flat.low) < 1.25


def test_unequal_group_sizes_work():
    values = np.r_[np.zeros(3), np.ones(10), np.full(5, 2.0)]
    groups = [("a", 1)] * 3 + [("b", 1)] * 10 + [("c", 2)] * 5     # tuple labels
    e = bootstrap_ci(values, groups=groups, n_boot=300)
    assert e.n_groups == 3 and 0.0 <= e.low <= e.value <= e.high <= 2.0


def test_nan_is_an_error_naming_the_count():
    with pytest.raises(McdmError, match=r"2 of 6 values are NaN.*penalised"):
        bootstrap_ci([1.0, np.nan, 2.0, 3.0, np.nan, 4.0])


@pytest.mark.parametrize("kwargs, msg", [
    (dict(values=[1.0]), ">= 2 units"),
    (dict(values=[1.0, 2.0], groups=[0, 0]), ">= 2 groups"),
    (dict(values=[1.0, 2.0], groups=[0, 1, 1]), "3 labels for 2 values"),
    (dict(values=[1.0, 2.0], level=1.0), "level"),
])
def test_bad_input_raises(kwargs, msg):
    with pytest.raises(McdmError, match=msg):
        bootstrap_ci(**kwargs)


# ------------------------------------------------------------------------------------------------
# paired_difference / set_level_difference


def test_paired_difference_is_the_mean_of_matched_differences():
    ids = [("c1", 0), ("c2", 0), ("c1", 1), ("c2", 1)]
    a = pd.Series([0.9, 0.5, 0.8, 0.6], index=pd.MultiIndex.from_tuples(ids))
    b = pd.Series([0.55, 0.7, 0.4, 0.3], index=pd.MultiIndex.from_tuples(ids[::-1]))  # other order
    e = paired_difference(a, b, n_boot=200)
    # matched: c1/0: 0.9-0.3, c2/0: 0.5-0.4, c1/1: 0.8-0.7, c2/1: 0.6-0.55
    assert e.value == pytest.approx((0.6 + 0.1 + 0.1 + 0.05) / 4, abs=1e-15)
    assert e.n == 4 and e.method.startswith("paired")
    # The mean cannot see a mis-pairing (it is mean(a) - mean(b) either way); the CI can:
    by_hand = bootstrap_ci([0.6, 0.1, 0.1, 0.05], n_boot=200)
    assert (e.low, e.high) == pytest.approx((by_hand.low, by_hand.high), abs=1e-15)
    same = paired_difference([0.9, 0.5, 0.8, 0.6], [0.55, 0.7, 0.4, 0.3],
                             pair_ids=(ids, ids[::-1]), n_boot=200)
    assert same == e


def test_pairing_detects_a_small_effect_hidden_by_clip_variation():
    rng = np.random.default_rng(0)
    clip = rng.normal(0.6, 0.15, size=40)                           # clip difficulty, shared
    a, b = clip + 0.02 + rng.normal(0, 0.005, 40), clip + rng.normal(0, 0.005, 40)
    assert verdict(paired_difference(a, b), higher_is_better=True) == "supported"
    # Ignoring the pairing (a and b resampled independently) cannot see it:
    ca, cb = bootstrap_ci(a, seed=1), bootstrap_ci(b, seed=2)
    assert ca.low < cb.high


def test_mismatched_pairs_name_the_missing_ids():
    a = pd.Series([1.0, 2.0, 3.0], index=["c1", "c2", "c3"])
    b = pd.Series([1.0, 2.0, 5.0], index=["c1", "c2", "c9"])
    missing = r"1 ids missing in b \['c3'\], 1 ids missing in a \['c9'\]"
    with pytest.raises(McdmError, match=missing):
        paired_difference(a, b)
    with pytest.raises(McdmError, match=r"missing in b \[3\]"):
        paired_difference([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    with pytest.raises(McdmError, match=r"duplicate pair ids in b: \['c1'\]"):
        paired_difference(a, pd.Series([1.0, 2.0, 3.0], index=["c1", "c1", "c2"]))
    with pytest.raises(McdmError, match=r"1 of 3 values of a are NaN"):
        paired_difference([1.0, np.nan, 2.0], [1.0, 2.0, 3.0])


def test_paired_groups_by_callable_on_pair_id():
    ids = [(f"c{c}", s) for s in range(4) for c in range(10)]
    rng = np.random.default_rng(1)
    d = np.repeat([0.0, 0.2, -0.1, 0.3], 10) + rng.normal(0, 0.01, 40)   # seed effect on d
    a = pd.Series(d + 1.0, index=pd.MultiIndex.from_tuples(ids))
    b = pd.Series(np.ones(40), index=pd.MultiIndex.from_tuples(ids))
    flat, cluster = paired_difference(a, b), paired_difference(a, b, groups=lambda k: k[1])
    assert cluster.n_groups == 4 and cluster.value == pytest.approx(flat.value)
    assert cluster.high - cluster.low > 3 * (flat.high - flat.low)
    assert paired_difference(a, b, groups=[k[1] for k in ids]) == cluster


def test_set_level_with_a_mean_metric_reproduces_the_paired_bootstrap():
    # A "set-level" metric that is the mean of the chosen clips: same indices for both arms means
    # mean(a[i]) - mean(b[i]) = mean(d[i]), so the CI equals paired_difference's (same seed).
    rng = np.random.default_rng(2)
    a, b = rng.normal(1.0, 1.0, 30), rng.normal(0.8, 1.0, 30)
    s = set_level_difference(lambda i: a[i].mean(), lambda i: b[i].mean(), 30, n_boot=400, seed=5)
    p = paired_difference(a, b, n_boot=400, seed=5)
    assert (s.value, s.low, s.high) == pytest.approx((p.value, p.low, p.high), abs=1e-12)


def test_set_level_passes_the_same_indices_to_both_arms():
    calls_a, calls_b = [], []
    x = np.arange(12.0)
    e = set_level_difference(lambda i: calls_a.append(i.copy()) or np.var(x[i]),
                             lambda i: calls_b.append(i.copy()) or 0.5 * np.var(x[i]), 12,
                             groups=np.repeat([0, 1, 2], 4), n_boot=50)
    assert len(calls_a) == len(calls_b) == 51                         # 50 resamples + the full set
    assert all(np.array_equal(i, j) for i, j in zip(calls_a, calls_b))
    assert np.array_equal(calls_a[0], np.arange(12))                   # the full set first
    assert e.value == pytest.approx(0.5 * np.var(x)) and e.n_groups == 3


# ------------------------------------------------------------------------------------------------
# Verdicts


@pytest.mark.parametrize("low, high, higher, expected", [
    (0.01, 0.05, True, "supported"),
    (-0.05, -0.01, True, "refuted"),
    (-0.01, 0.05, True, "inconclusive"),
    (-0.05, -0.01, False, "supported"),      # lower is better (FID): a - b < 0 means a is better
    (0.01, 0.05, False, "refuted"),
    (-0.05, 0.01, False, "inconclusive"),
    (0.0, 0.05, True, "inconclusive"),       # touching the margin is not beyond it
])
def test_verdict_on_hand_made_cis(low, high, higher, expected):
    assert verdict(est(low, high), higher_is_better=higher) == expected


def test_verdict_margin():
    assert verdict(est(0.01, 0.05), True, margin=0.02) == "inconclusive"
    assert verdict(est(0.03, 0.05), True, margin=0.02) == "supported"
    assert verdict(est(0.00, 0.01), True, margin=0.02) == "refuted"      # better, but not by 0.02
    # non-inferiority: identity drift (lower is better) of a no larger than b's + 0.01
    assert verdict(est(-0.002, 0.005), False, margin=-0.01) == "supported"
    assert verdict(est(0.02, 0.04), False, margin=-0.01) == "refuted"


def test_conjunction():
    assert conjunction(["supported"] * 3) == "supported"
    assert conjunction(["supported", "inconclusive", "supported"]) == "inconclusive"
    assert conjunction(["supported", "refuted", "inconclusive"]) == "refuted"
    with pytest.raises(McdmError):
        conjunction([])


def _arms(levels: dict[str, float], noise: float, seed: int = 0) -> dict[str, pd.Series]:
    rng = np.random.default_rng(seed)
    ids = pd.MultiIndex.from_product([[f"c{i}" for i in range(12)], [0, 1, 2]])
    clip = np.repeat(rng.normal(0.6, 0.1, 12), 3)
    return {k: pd.Series(clip + v + rng.normal(0, noise, len(ids)), index=ids)
            for k, v in levels.items()}


def test_ordering_verdict():
    chain = ["full", "wo_mta", "wo_fpc", "wo_fa"]
    clear = _arms({"full": 0.3, "wo_mta": 0.2, "wo_fpc": 0.1, "wo_fa": 0.0}, noise=0.01)
    v, steps = ordering_verdict(chain, clear, higher_is_better=True)
    assert v == "supported" and [s["verdict"] for s in steps] == ["supported"] * 3
    assert [(s["better"], s["worse"]) for s in steps] == list(zip(chain[:-1], chain[1:]))
    assert steps[0]["value"] == pytest.approx((clear["full"] - clear["wo_mta"]).mean())
    assert ordering_verdict(chain, clear, higher_is_better=False)[0] == "refuted"   # e.g. FID
    swapped = _arms({"full": 0.3, "wo_mta": 0.1, "wo_fpc": 0.2, "wo_fa": 0.0}, noise=0.01)
    v, steps = ordering_verdict(chain, swapped, higher_is_better=True)
    assert v == "refuted" and [s["verdict"] for s in steps] == ["supported", "refuted", "supported"]
    tied = _arms({"full": 0.3, "wo_mta": 0.2, "wo_fpc": 0.2, "wo_fa": 0.0}, noise=0.01)
    v, steps = ordering_verdict(chain, tied, higher_is_better=True, groups=lambda k: k[1])
    assert v == "inconclusive" and steps[1]["verdict"] == "inconclusive"
    assert steps[1]["n_groups"] == 3
    with pytest.raises(McdmError, match="no values for arms"):
        ordering_verdict(["full", "b1"], clear, higher_is_better=True)


# ------------------------------------------------------------------------------------------------
# trend_verdict


def test_trend_slope_equals_polyfit_of_the_mean_curve():
    rng = np.random.default_rng(0)
    x = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    y = 0.8 - 0.1 * x + rng.normal(0, 0.02, size=(20, 5))
    v, e = trend_verdict(x, y, claim="decreases")
    assert e.value == pytest.approx(np.polyfit(x, y.mean(0), 1)[0], abs=1e-12)
    assert v == "supported" and e.high < 0
    assert trend_verdict(x, y, claim="increases")[0] == "refuted"


def test_exact_line_gives_a_point_ci():
    x = np.array([1.0, 2.0, 4.0])
    _, e = trend_verdict(x, np.tile(3.0 - 2.0 * x, (5, 1)), claim="decreases", n_boot=100)
    assert e.value == e.low == e.high == pytest.approx(-2.0)


def test_trend_on_noise_is_inconclusive():
    rng = np.random.default_rng(1)
    x = np.linspace(0, 1, 6)
    y = 0.7 + rng.normal(0, 0.05, size=(12, 6))
    for method in ("slope", "spearman"):
        v, e = trend_verdict(x, y, claim="decreases", method=method, groups=np.arange(12) % 3)
        assert v == "inconclusive", (method, e)


def test_trend_spearman_on_a_monotone_but_curved_decline():
    x = np.array([0.1, 0.2, 0.4, 0.8])
    rng = np.random.default_rng(2)
    y = np.exp(-3 * x) + rng.normal(0, 0.01, size=(15, 4))
    v, e = trend_verdict(x, y, claim="decreases", method="spearman")
    assert v == "supported" and e.value == pytest.approx(-1.0) and -1.0 <= e.low <= e.high < 0


def test_trend_bad_shapes():
    with pytest.raises(McdmError, match="replicates"):
        trend_verdict([0.0, 1.0], [0.3, 0.2], claim="decreases")
    with pytest.raises(McdmError, match="NaN"):
        trend_verdict([0.0, 1.0], [[0.3, np.nan], [0.2, 0.1]], claim="decreases")


# ------------------------------------------------------------------------------------------------
# Failures


def test_wilson_interval_by_hand_and_against_scipy():
    e = failure_rate(np.zeros(20, dtype=bool))
    assert e.value == 0.0 and e.low == 0.0 and e.high == pytest.approx(0.16113, abs=5e-5)
    z = stats.norm.ppf(0.975)        # hand: 0/20 -> upper = (z^2/n) / (1 + z^2/n)
    assert e.high == pytest.approx((z * z / 20) / (1 + z * z / 20), rel=1e-12)
    for k, n, level in [(3, 20, 0.95), (20, 20, 0.95), (7, 50, 0.9)]:
        ours = failure_rate(np.arange(n) < k, level=level)
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
        assert (ours.low, ours.high) == pytest.approx((ref.low, ref.high), abs=1e-12)
        assert ours.value == k / n and ours.method == "wilson"


def test_penalised_counts_nans_and_flagged_failures():
    values = np.array([0.8, np.nan, 0.7, 0.9, 0.6, np.inf])
    flagged = np.array([False, False, True, False, False, False])
    out, rate = penalised(values, flagged, penalty=-1.0)
    assert np.array_equal(out, [0.8, -1.0, -1.0, 0.9, 0.6, -1.0])
    assert rate.value == pytest.approx(3 / 6) and rate.n == 6
    assert math.isnan(values[1])                                       # input untouched
    survivors = values[np.isfinite(values) & ~flagged]
    assert out.mean() < survivors.mean()                               # dropping never helps
    out, rate = penalised([0.5, np.nan], None, penalty=0.0)
    assert list(out) == [0.5, 0.0] and rate.value == 0.5
    with pytest.raises(McdmError, match="shape"):
        penalised([0.5, 0.2], [True], penalty=0.0)
    with pytest.raises(McdmError, match="finite"):
        penalised([0.5], None, penalty=np.nan)


# ------------------------------------------------------------------------------------------------
# required_n


def test_required_n_closed_form():
    # (1.959964 + 0.841621)^2 * (1 / 0.5)^2 = 31.40 -> 32;  unpaired doubles: 62.8 -> 63
    assert required_n(0.5, 1.0) == 32
    assert required_n(-0.5, 1.0) == 32
    assert required_n(0.5, 1.0, paired=False) == 63
    for effect, sd, level, power in [(0.01, 0.03, 0.95, 0.8), (0.2, 0.5, 0.9, 0.9)]:
        z = stats.norm.ppf(1 - (1 - level) / 2) + stats.norm.ppf(power)
        assert required_n(effect, sd, level, power) == math.ceil(z * z * (sd / effect) ** 2)
    with pytest.raises(McdmError, match="non-zero"):
        required_n(0.0, 1.0)


def test_required_n_gives_the_promised_power():
    # Monte Carlo: at n = required_n, a two-sided z-test on mean(d) rejects ~80% of the time.
    effect, sd = 0.3, 1.0
    n = required_n(effect, sd)
    d = np.random.default_rng(0).normal(effect, sd, size=(4000, n))
    power = np.mean(np.abs(d.mean(1)) / (sd / math.sqrt(n)) > stats.norm.ppf(0.975))
    assert 0.77 <= power <= 0.85
