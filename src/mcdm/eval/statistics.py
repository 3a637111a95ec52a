"""Statistical evidence for comparisons: does the data support "full beats wo_mta on SSIM"?

Paper claims compare arms (variants, alpha values) on the same clips and seeds. Metric values
become an effect with a confidence interval (CI), and the CI a three-way verdict:

    supported     the whole CI lies on the claimed side of the margin
    refuted       the whole CI lies on the other side
    inconclusive  the CI straddles it (required_n says how many clips might settle it)

Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): draw B resamples x*_b of the N units with
replacement, compute theta*_b = statistic(x*_b) and report

    CI = [ q_{(1-level)/2}(theta*), q_{(1+level)/2}(theta*) ]        (np.quantile, linear)

Two-level (cluster) bootstrap (Davison & Hinkley 1997, sec. 3.8, resampling at both stages): with
``groups`` (e.g. the seed of every value) draw G groups with replacement, then within each drawn
group draw its n_g values with replacement. Values sharing a seed are not independent; a flat
bootstrap over clips x seeds gives too narrow a CI. With clips crossed with seeds this still treats
a clip's values under different seeds as unrelated; in paired differences the clip effect mostly
cancels (which is why we pair).

The percentile CI undercovers at small n (a few % at n = 30; badly at 3 groups): a verdict from
3 seeds is weak evidence whatever it says. A two-sided 95% CI used for a one-sided claim is a test
at 2.5%. NaN is never dropped: it is an error until penalised() has said how failures count.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Hashable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from mcdm.errors import McdmError

Verdict = Literal["supported", "refuted", "inconclusive"]


@dataclass(frozen=True)
class Estimate:
    """A point estimate ``value`` with its CI [low, high] at ``level``.

    n: units it is computed from (values, pairs, clips); n_groups: groups resampled at the first
    stage of a two-level bootstrap (None when flat); method: how the CI was made.
    """
    value: float
    low: float
    high: float
    n: int
    n_groups: int | None
    level: float
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Bootstrap core


def _finite(values, what: str) -> np.ndarray:
    """values as float64 (N,); NaN/inf is an error that names the count (failures are counted)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise McdmError(f"{what} must be one-dimensional, got shape {x.shape}")
    bad = int(np.sum(~np.isfinite(x)))
    if bad:
        raise McdmError(f"{bad} of {x.size} {what} are NaN/inf: count them as failures with "
                        f"penalised(values, failed_mask, penalty) instead of dropping them")
    return x


def _check(level: float, n_boot: int) -> None:
    if not 0 < level < 1 or n_boot < 1:
        raise McdmError(f"need 0 < level < 1 and n_boot >= 1, got level={level}, n_boot={n_boot}")


def _group_codes(groups, n: int) -> np.ndarray | None:
    """(N,) int codes 0..G-1 for any hashable group labels (seeds, (clip, seed) tuples), or None."""
    if groups is None:
        return None
    labels = list(groups)
    if len(labels) != n:
        raise McdmError(f"groups has {len(labels)} labels for {n} values")
    index: dict[Hashable, int] = {}
    codes = np.array([index.setdefault(g, len(index)) for g in labels], dtype=np.int64)
    if len(index) < 2:
        raise McdmError("a two-level bootstrap needs >= 2 groups, got 1")
    return codes


def _resamples(n: int, n_boot: int, rng: np.random.Generator, codes: np.ndarray | None):
    """B bootstrap index sets into N units: an int array (B, N) when flat, else a list of B arrays.

    Two-level: draw G group codes with replacement, then n_g members of each drawn group with
    replacement (a resample's length varies when group sizes do)."""
    if codes is None:
        return rng.integers(0, n, size=(n_boot, n))                              # (B, N)
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]      # G x (n_g,)
    out = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(members), size=len(members))                 # (G,)
        out.append(np.concatenate([members[g][rng.integers(0, members[g].size, members[g].size)]
                                   for g in drawn]))
    return out


def _apply(statistic: Callable, x: np.ndarray, idx) -> np.ndarray:
    """statistic over each resample x[idx_b] -> (B,); vectorised when statistic takes axis=."""
    if isinstance(idx, np.ndarray):
        try:
            out = np.asarray(statistic(x[idx], axis=-1), dtype=np.float64)      # (B, N) -> (B,)
            if out.shape == (idx.shape[0],):
                return out
        except TypeError:                                                        # no axis= keyword
            pass
    return np.array([statistic(x[i]) for i in idx], dtype=np.float64)


def _bootstrap(value: float, n: int, boots_of: Callable, groups, n_boot: int, level: float,
               seed: int, what: str = "") -> Estimate:
    """Estimate(value, percentile CI): boots_of(resamples) -> (B,) statistics, one per resample."""
    if n < 2:
        raise McdmError(f"a bootstrap CI needs >= 2 units, got {n}")
    _check(level, n_boot)
    codes = _group_codes(groups, n)
    boots = np.asarray(boots_of(_resamples(n, n_boot, np.random.default_rng(seed), codes)),
                       dtype=np.float64)                                         # (B,)
    bad = int(np.sum(~np.isfinite(boots)))
    if bad:
        raise McdmError(f"the statistic is NaN/inf on {bad} of {boots.size} bootstrap resamples")
    low, high = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    n_groups = None if codes is None else int(codes.max() + 1)
    method = what + "percentile bootstrap" + ("" if codes is None else " (two-level)")
    return Estimate(float(value), float(low), float(high), int(n), n_groups, level, method)


def bootstrap_ci(values, statistic: Callable = np.mean, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0, groups=None) -> Estimate:
    """Percentile bootstrap CI of ``statistic(values)``; two-level when ``groups`` is given.

    values: (N,) finite numbers (NaN raises: see penalised()). statistic: 1-D array -> float; if
    it accepts ``axis=`` (np.mean, np.median) all resamples are evaluated in one call.
    groups: (N,) label per value (e.g. its seed) for the cluster bootstrap; >= 2 distinct labels.
    value is statistic on the full sample.
    """
    x = _finite(values, "values")                                                # (N,)
    return _bootstrap(statistic(x), x.size, lambda idx: _apply(statistic, x, idx), groups,
                      n_boot, level, seed)


# ------------------------------------------------------------------------------------------------
# Differences between two arms


def _show(ids: list, k: int = 5) -> str:
    return "[" + ", ".join(map(repr, ids[:k])) + (", ..." if len(ids) > k else "") + "]"


def _keyed(values, ids, side: str) -> dict:
    """{pair id: value}: ids given, else a pd.Series' index, else positions 0..N-1."""
    if ids is None:
        ids = list(values.index) if isinstance(values, pd.Series) else range(len(values))
    keys, vals = list(ids), _finite(np.asarray(values, dtype=np.float64), f"values of {side}")
    if len(keys) != vals.size:
        raise McdmError(f"{side} has {vals.size} values but {len(keys)} pair ids")
    out = dict(zip(keys, vals))
    if len(out) != len(keys):
        dups = [k for k in out if keys.count(k) > 1]
        raise McdmError(f"duplicate pair ids in {side}: {_show(dups)}")
    return out


def paired_difference(a, b, pair_ids: tuple[Sequence, Sequence] | None = None, groups=None,
                      n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Effect of arm a over arm b: the mean difference over matched pairs, with a bootstrap CI.

        d_i = a_i - b_i  (same clip, same seed/sampling noise in both arms)
        effect = (1/P) sum_i d_i,   CI: percentile bootstrap of mean(d) over pairs (or groups)

    Pairing removes the clip-to-clip variation both arms share. Pairs are matched
    - on ``pair_ids=(ids_a, ids_b)``: one hashable key per value, e.g. (clip, seed) tuples;
    - else on the index when a and b are pd.Series (e.g. a MultiIndex (clip, seed));
    - else by position.
    Ids must be unique per side and the same on both sides; otherwise McdmError lists the ids
    missing on each side (a clip that failed in one arm is counted with penalised(), not dropped).

    groups: the cluster of each pair (e.g. its seed) for the two-level bootstrap, as a sequence
    aligned with a, or a callable pair_id -> group. The sign is a - b in the metric's units;
    verdict() applies the metric's direction.
    """
    ids_a, ids_b = (None, None) if pair_ids is None else pair_ids
    da, db = _keyed(a, ids_a, "a"), _keyed(b, ids_b, "b")
    only_a, only_b = [k for k in da if k not in db], [k for k in db if k not in da]
    if only_a or only_b:
        raise McdmError(f"pairs do not match: {len(only_a)} ids missing in b {_show(only_a)}, "
                        f"{len(only_b)} ids missing in a {_show(only_b)}")
    keys = list(da)                                                              # a's order
    d = np.array([da[k] - db[k] for k in keys])                                  # (P,)
    if callable(groups):
        groups = [groups(k) for k in keys]
    return _bootstrap(d.mean(), d.size, lambda idx: _apply(np.mean, d, idx), groups, n_boot,
                      level, seed, what="paired ")


def set_level_difference(metric_a: Callable[[np.ndarray], float],
                         metric_b: Callable[[np.ndarray], float], n: int, groups=None,
                         n_boot: int = 500, level: float = 0.95, seed: int = 0) -> Estimate:
    """Paired bootstrap of a set-level metric difference metric_a - metric_b (FID, FVD, E-FID).

    metric_a(idx) -> float computes arm a's metric on test clips ``idx`` (an int array into the N
    clips, repeats allowed), e.g. ``lambda idx: fvd(real[idx], full[idx])``. Every resample draws
    ONE idx and gives it to both arms (the same clips, so clip difficulty cancels):

        effect = metric_a(0..N-1) - metric_b(0..N-1),   theta*_b = metric_a(idx_b) - metric_b(idx_b)

    groups: (N,) cluster per clip for the two-level scheme. Caveat: Fréchet metrics are biased
    upward on small sets and a resample with repeated clips has fewer distinct ones, so each arm's
    theta* is shifted up; the shift is shared by both arms and largely cancels in the difference,
    but do not use this scheme for one arm's FID alone. Metrics are expensive: n_boot is 500.
    """
    full = np.arange(n)
    return _bootstrap(float(metric_a(full)) - float(metric_b(full)), n,
                      lambda idx: [float(metric_a(i)) - float(metric_b(i)) for i in idx],
                      groups, n_boot, level, seed, what="paired set-level ")


# ------------------------------------------------------------------------------------------------
# Verdicts on claims


def verdict(diff: Estimate, higher_is_better: bool, margin: float = 0.0) -> Verdict:
    """Verdict on "a is better than b by more than margin" from the CI [low, high] of a - b.

    Orient so that positive means better, s = +1 if higher_is_better else -1, [lo, hi] = sorted
    (s * low, s * high):
        supported     lo > margin   (the whole CI beyond the margin on the claimed side)
        refuted       hi < margin   (the whole CI on the other side)
        inconclusive  otherwise
    margin (metric units, oriented): 0 = "a beats b"; > 0 = "beats by more than margin";
    < 0 = non-inferiority, "a is no worse than b by more than |margin|".
    """
    s = 1.0 if higher_is_better else -1.0
    lo, hi = sorted((s * diff.low, s * diff.high))
    return "supported" if lo > margin else "refuted" if hi < margin else "inconclusive"


def conjunction(verdicts: Sequence[Verdict]) -> Verdict:
    """All supported -> supported; any refuted -> refuted; else inconclusive."""
    if not verdicts:
        raise McdmError("no verdicts to combine")
    if any(v == "refuted" for v in verdicts):
        return "refuted"
    return "supported" if all(v == "supported" for v in verdicts) else "inconclusive"


def ordering_verdict(chain: Sequence[str], values: Mapping[str, object], higher_is_better: bool,
                     margin: float = 0.0, groups=None, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> tuple[Verdict, list[dict]]:
    """Verdict on an ordering claim chain[0] > chain[1] > ... (best first) on one metric.

    values[arm]: that arm's per-pair values (a pd.Series keyed by pair id, or arrays aligned by
    position). Each adjacent step (chain[i], chain[i+1]) is a paired_difference + verdict; the
    claim is their conjunction(). "Supported" needs every step supported, an intersection-union
    test valid at the per-step level without correction (Berger 1982); "refuted" fires if any of
    the k steps is refuted, so its false-alarm rate can grow up to k x the per-step rate.
    groups: as in paired_difference (a callable pair_id -> group suits every step).
    Returns (verdict, steps): one dict per step, {better, worse, **Estimate.to_dict(), verdict}.
    """
    if len(chain) < 2:
        raise McdmError(f"an ordering needs >= 2 arms, got {list(chain)}")
    missing = [arm for arm in chain if arm not in values]
    if missing:
        raise McdmError(f"no values for arms {missing}")
    steps = []
    for better, worse in zip(chain[:-1], chain[1:]):
        est = paired_difference(values[better], values[worse], groups=groups, n_boot=n_boot,
                                level=level, seed=seed)
        steps.append({"better": better, "worse": worse, **est.to_dict(),
                      "verdict": verdict(est, higher_is_better, margin)})
    return conjunction([s["verdict"] for s in steps]), steps


def trend_verdict(x, y, claim: Literal["increases", "decreases"],
                  method: Literal["slope", "spearman"] = "slope", groups=None, n_boot: int = 2000,
                  level: float = 0.95, seed: int = 0) -> tuple[Verdict, Estimate]:
    """Verdict on a monotone trend, e.g. "SSIM decreases as alpha grows", from its sign's CI.

    x: (K,) settings; y: (R, K) metric of replicate r (a clip, seed or (clip, seed)) at x_k. The
    bootstrap resamples rows (or groups of rows, groups: (R,)), keeping each row's curve intact.

    slope: least-squares slope of the mean curve ybar_k = mean_r y_rk,
        beta = sum_k (x_k - xbar)(ybar_k - mean(ybar)) / sum_k (x_k - xbar)^2,
      linear in y, hence equal to the mean of the per-row slopes beta_r: we bootstrap mean(beta_r).
    spearman: Spearman rho of (x, mean curve) per resample, in [-1, 1]; with few settings it is
      coarse, and "supported" means the resampled mean curve is ordered the claimed way nearly
      every time (a monotone claim without assuming linearity).
    supported: the CI lies entirely on the claimed side of 0; refuted: entirely on the other.
    """
    if claim not in ("increases", "decreases") or method not in ("slope", "spearman"):
        raise McdmError(f"claim must be increases/decreases and method slope/spearman, got "
                        f"{claim!r}, {method!r}")
    xs = _finite(x, "x")                                                         # (K,)
    ys = np.asarray(y, dtype=np.float64)
    if ys.ndim != 2 or ys.shape[1] != xs.size or ys.shape[0] < 2:
        raise McdmError(f"y must be (replicates >= 2, {xs.size} settings), got {ys.shape}")
    _finite(ys.reshape(-1), "values of y")
    if np.ptp(xs) == 0:
        raise McdmError("x must take at least two different values")
    if method == "slope":
        xc = xs - xs.mean()                                                      # (K,)
        beta = (ys - ys.mean(1, keepdims=True)) @ xc / (xc @ xc)                 # (R,)
        est = _bootstrap(beta.mean(), beta.size, lambda idx: _apply(np.mean, beta, idx), groups,
                         n_boot, level, seed, what="least-squares slope, ")
    else:                                                                        # spearman
        rx = stats.rankdata(xs) - (xs.size + 1) / 2                              # (K,) centred

        def rho(curves: np.ndarray) -> np.ndarray:                               # (B, K) -> (B,)
            rc = stats.rankdata(curves, axis=-1)
            rc = rc - rc.mean(-1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                return rc @ rx / (np.linalg.norm(rc, axis=-1) * np.linalg.norm(rx))

        est = _bootstrap(rho(ys.mean(0)[None])[0], ys.shape[0],
                         lambda idx: rho(np.stack([ys[i].mean(0) for i in idx])),  # (B, K) curves
                         groups, n_boot, level, seed, what="spearman rho of the mean curve, ")
    return verdict(est, higher_is_better=claim == "increases"), est


# ------------------------------------------------------------------------------------------------
# Failures count against a model


def failure_rate(failed_mask, level: float = 0.95) -> Estimate:
    """Fraction failed p = k/n with the Wilson score interval (Wilson 1927):

        z = Phi^{-1}((1 + level) / 2)
        center = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        CI     = [center - half, center + half]

    Unlike p +- z sqrt(p(1-p)/n) it is not [0, 0] at k = 0: 0 failures of 20 -> [0, 0.161].
    """
    f = np.asarray(failed_mask, dtype=bool).reshape(-1)                          # (N,)
    if f.size == 0:
        raise McdmError("failure_rate of an empty set")
    _check(level, 1)
    n, k = f.size, int(f.sum())
    p, z = k / n, float(stats.norm.ppf((1 + level) / 2))
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Estimate(p, max(0.0, center - half), min(1.0, center + half), n, None, level, "wilson")


def penalised(values, failed_mask, penalty: float,
              level: float = 0.95) -> tuple[np.ndarray, Estimate]:
    """Replace failed items by ``penalty`` so that failing (or dropping frames) never helps a score.

        failed_i = failed_mask_i or not isfinite(values_i)    (NaN is a failure, flagged or not)
        out_i    = penalty if failed_i else values_i

    penalty should be the worst value the metric can take, e.g. SSIM -1, Sync-C 0, mouth-opening
    correlation -1, cosine identity distance 2; for unbounded lower-is-better metrics (Sync-D) a
    value no better than the worst observed. failed_mask: (N,) bools or None (only NaN/inf fail).
    Returns (out (N,) float64, failure_rate(failed)): report the rate beside the penalised mean.
    """
    x = np.asarray(values, dtype=np.float64)                                     # (N,)
    m = np.zeros(x.shape, bool) if failed_mask is None else np.asarray(failed_mask, dtype=bool)
    if x.ndim != 1 or m.shape != x.shape or not math.isfinite(penalty):
        raise McdmError(f"need values (N,), failed_mask (N,) and a finite penalty, got shapes "
                        f"{x.shape}, {m.shape} and penalty {penalty}")
    failed = m | ~np.isfinite(x)
    return np.where(failed, penalty, x), failure_rate(failed, level)


# ------------------------------------------------------------------------------------------------
# Sample size


def required_n(effect: float, sd: float, level: float = 0.95, power: float = 0.8,
               paired: bool = True) -> int:
    """Units (clips or seeds) needed to detect ``effect`` by a two-sided test at alpha = 1 - level.

        paired:    n = ceil( (z_{1-alpha/2} + z_{power})^2 (sd / effect)^2 ),  sd of d_i = a_i - b_i
        unpaired:  n = ceil( 2 (z_{1-alpha/2} + z_{power})^2 (sd / effect)^2 ) per arm, sd per arm

    Normal approximation: below ~30 units a t-test needs a few more. For a cluster bootstrap the
    units are the groups: use the sd of the group means.
    """
    if effect == 0 or not math.isfinite(effect) or not 0 < sd < math.inf or not 0 < power < 1:
        raise McdmError(f"need a finite non-zero effect, 0 < sd < inf and 0 < power < 1, got "
                        f"effect={effect}, sd={sd}, power={power}")
    _check(level, 1)
    z = stats.norm.ppf((1 + level) / 2) + stats.norm.ppf(power)
    n = (1 if paired else 2) * z * z * (sd / effect) ** 2
    return int(math.ceil(n - 1e-9))
