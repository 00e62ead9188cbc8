"""Statistics for the token-level analysis: a cluster bootstrap of group means (clusters =
windows, since tokens of a window are not independent) and OLS with cluster-robust
standard errors, in plain numpy."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class BootMeans:
    """Group means and their bootstrap replicates.

    ``mean``, ``n``: shape (K,); ``boot``: (B, K) replicate means (NaN where a replicate
    drew no token of the group).
    """

    labels: list[str]
    mean: np.ndarray
    n: np.ndarray
    boot: np.ndarray

    def ci(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        a = (1 - level) / 2 * 100
        with warnings.catch_warnings():  # all-NaN columns: groups with no tokens
            warnings.simplefilter("ignore", RuntimeWarning)
            return (np.nanpercentile(self.boot, a, axis=0),
                    np.nanpercentile(self.boot, 100 - a, axis=0))

    def diff(self, a: str, b: str, level: float = 0.95) -> tuple[float, float, float]:
        """Mean of group a minus mean of group b, with its bootstrap CI (same replicates)."""
        i, j = self.labels.index(a), self.labels.index(b)
        d = self.boot[:, i] - self.boot[:, j]
        q = (1 - level) / 2 * 100
        return (float(self.mean[i] - self.mean[j]), float(np.nanpercentile(d, q)),
                float(np.nanpercentile(d, 100 - q)))

    def rows(self, level: float = 0.95) -> list[dict]:
        lo, hi = self.ci(level)
        return [{"group": g, "mean": float(m), "lo": float(a), "hi": float(b), "n": int(k)}
                for g, m, a, b, k in zip(self.labels, self.mean, lo, hi, self.n, strict=True)]


def cluster_weights(n_clusters: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n_clusters) multinomial resampling counts: each replicate redraws clusters
    with replacement. Reuse the same matrix to get comparable replicates across tables."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters),
                           size=n_boot).astype(np.float64)


def boot_means(values: np.ndarray, clusters: np.ndarray, groups: np.ndarray,
               weights: np.ndarray, labels: list[str] | None = None) -> BootMeans:
    """Means of ``values`` per group with a cluster bootstrap.

    ``clusters``: int codes 0..C-1 (C = weights.shape[1]); ``groups``: int codes 0..K-1
    (negative codes are ignored).
    """
    values = np.asarray(values, np.float64)
    keep = groups >= 0
    values, clusters, groups = values[keep], clusters[keep], groups[keep]
    n_clusters = weights.shape[1]
    k = int(groups.max()) + 1 if len(groups) else 0
    k = max(k, len(labels) if labels else 0)
    flat = clusters * k + groups
    sums = np.bincount(flat, values, minlength=n_clusters * k).reshape(n_clusters, k)
    cnts = np.bincount(flat, minlength=n_clusters * k).reshape(n_clusters, k).astype(np.float64)
    n = cnts.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums.sum(0) / n
        boot = (weights @ sums) / (weights @ cnts)
    return BootMeans(labels or [str(i) for i in range(k)], mean, n.astype(np.int64), boot)


@dataclass
class OLSResult:
    """Coefficients with cluster-robust (CR1) standard errors and 95% CIs."""

    names: list[str]
    coef: np.ndarray
    se: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: int
    n_clusters: int
    r2: float

    def rows(self) -> list[dict]:
        return [{"term": t, "coef": float(c), "se": float(s), "lo": float(a), "hi": float(b)}
                for t, c, s, a, b in zip(self.names, self.coef, self.se, self.lo, self.hi,
                                         strict=True)]


def ols(X: np.ndarray, y: np.ndarray, names: list[str], clusters: np.ndarray | None = None,
        level: float = 0.95) -> OLSResult:
    """Least squares y = X b + e; SEs clustered on ``clusters`` (HC1 when None).

    X: (N, K) including an intercept column when one is wanted.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    n, k = X.shape
    xtx_inv = np.linalg.pinv(X.T @ X)
    coef = xtx_inv @ (X.T @ y)
    u = y - X @ coef
    if clusters is None:
        clusters = np.arange(n)
    _, codes = np.unique(clusters, return_inverse=True)
    g = int(codes.max()) + 1
    scores = np.stack([np.bincount(codes, X[:, j] * u, minlength=g) for j in range(k)], axis=1)
    meat = scores.T @ scores
    corr = (g / max(g - 1, 1)) * ((n - 1) / max(n - k, 1))
    cov = corr * xtx_inv @ meat @ xtx_inv
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    try:
        from scipy.stats import t as student_t

        crit = float(student_t.ppf(0.5 + level / 2, max(g - 1, 1)))
    except ImportError:  # pragma: no cover - scipy is optional
        crit = 1.959963984540054
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((u ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return OLSResult(list(names), coef, se, coef - crit * se, coef + crit * se, n, g, r2)
