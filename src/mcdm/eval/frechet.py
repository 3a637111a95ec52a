"""Fréchet distance between Gaussians fitted to two feature sets (FID, FVD and E-FID share it).

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})        (Dowson & Landau 1982;
                                                                        Heusel et al. 2017, FID)

Everything is float64. Covariances are the unbiased sample covariance (``np.cov``, ddof=1), as in
pytorch-fid and torchmetrics.

Two ways to get Tr((S_1 S_2)^{1/2}):

- ``method="eigh"`` (default). S_1 S_2 is similar to the symmetric PSD matrix S_1^{1/2} S_2 S_1^{1/2}
  (conjugate by S_1^{1/2}), so its eigenvalues are real and >= 0 and Tr((S_1 S_2)^{1/2}) is the sum
  of their square roots. Two symmetric eigen-decompositions: exact in exact arithmetic, never
  complex, well defined when a covariance is singular (fewer samples than feature dimensions, the
  usual case for our small test sets), and much faster than ``sqrtm`` at 2048-d (scipy 1.17's
  ``sqrtm`` takes ~100 s for one 2048 x 2048 product on 2 cores; the eigen route ~10 s).
- ``frechet_from_features`` with at most ``SVD_MAX_ROWS`` samples in the smaller set (or fewer than
  dimensions): the same trace from one SVD of the
  N1 x N2 product of the centred feature matrices (see there); the D x D matrices never appear.
- ``method="sqrtm"``: pytorch-fid's algorithm verbatim in spirit: ``scipy.linalg.sqrtm(S_1 @ S_2)``;
  if the result is not finite (singular product), add ``eps * I`` to both covariances and retry;
  a negligible imaginary part is dropped, a large one is an error. Kept as the cross-check.

The tests pin both methods against an independent scipy ``sqrtm`` reference to 1e-6.

The linear algebra runs on one BLAS thread: on the 2-core target, multi-threaded LAPACK gains
little, and while other processes hold the cores OpenBLAS's spinning threads made one 345 x 345
``eigh`` take 5 s instead of 0.09 s (2048 x 2048: 34 s instead of 9 s).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from threadpoolctl import ThreadpoolController

from mcdm.errors import McdmError

# one controller for the process: finding the BLAS libraries costs about 2 ms, paid once, not per distance
# (the claims' bootstrap computes thousands of distances)
_BLAS = ThreadpoolController()
SVD_MAX_ROWS = 512  # below this many rows in the smaller set the N1 x N2 SVD beats the D x D eigen route


def _features(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise McdmError(f"Fréchet statistics need at least 2 feature rows of shape (N, D); got {x.shape}")
    if not np.isfinite(x).all():
        raise McdmError("Fréchet statistics: features contain NaN or inf")
    return x


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,), unbiased covariance (D, D), both float64."""
    x = _features(features)
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _rank_floor(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off (below D * eps * max) set to 0: the square root
    would otherwise turn 1e-15 noise on a singular covariance's null space into 3e-8 each."""
    tol = len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max()), 0.0)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_rank_floor(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i(S_1^{1/2} S_2 S_1^{1/2}))."""
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(_rank_floor(lam)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # singular product: the eps-offset fix of pytorch-fid
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > 1e-3 * max(1.0, float(np.abs(covmean.real).max())):
            raise McdmError(f"Fréchet distance: sqrtm has a large imaginary part ({imag:.3g}); use method='eigh'")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    method: Literal["eigh", "sqrtm"] = "eigh",
) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise McdmError(
            f"Fréchet distance: shapes differ (mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape})"
        )
    diff = mu1 - mu2
    if method not in ("eigh", "sqrtm"):
        raise McdmError(f"Fréchet distance: unknown method {method!r} (eigh or sqrtm)")
    with _BLAS.limit(limits=1, user_api="blas"):
        if method == "eigh":
            tr_covmean = trace_sqrt_product(sigma1, sigma2)
        else:
            tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    # d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^{1/2})
    d2 = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(d2, 0.0)  # d^2 >= 0; a tiny negative value is round-off


def frechet_from_features(real: np.ndarray, fake: np.ndarray, method: Literal["eigh", "sqrtm"] = "eigh") -> float:
    """Fréchet distance between Gaussians fitted to (N1, D) and (N2, D) feature sets.

    With fewer samples than dimensions, or at most ``SVD_MAX_ROWS`` in the smaller set
    (``method="eigh"``), the D x D matrices are never formed:
    with centred features A_1 (N1 x D), A_2 (N2 x D), S_i = A_i^T A_i / (N_i - 1), the non-zero
    eigenvalues of S_1 S_2 are the squared singular values of A_1 A_2^T / sqrt((N1 - 1)(N2 - 1))
    (eig(XY) = eig(YX) away from 0), so Tr((S_1 S_2)^{1/2}) is that matrix's nuclear norm: one
    SVD of an N1 x N2 matrix instead of two D x D eigen-decompositions. Exact, not an approximation.
    """
    x, y = _features(real), _features(fake)
    if method != "eigh" or x.shape[1] != y.shape[1] or min(len(x), len(y)) > max(x.shape[1], SVD_MAX_ROWS):
        return frechet_distance(*feature_stats(x), *feature_stats(y), method=method)
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    a1, a2 = x - mu1, y - mu2
    n1, n2 = len(x) - 1, len(y) - 1
    with _BLAS.limit(limits=1, user_api="blas"):
        tr_covmean = float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()) / np.sqrt(n1 * n2)
    diff = mu1 - mu2
    # d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^{1/2}),  Tr(S_i) = ||A_i||_F^2 / (N_i - 1)
    d2 = float(diff @ diff + (a1 * a1).sum() / n1 + (a2 * a2).sum() / n2 - 2.0 * tr_covmean)
    return max(d2, 0.0)
