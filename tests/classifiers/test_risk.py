"""Thresholds with a guarantee (classifiers/training/risk.py)."""

from __future__ import annotations

import numpy as np
import pytest

from classifiers.training.risk import (
    clopper_pearson_upper,
    crc_threshold,
    quality_lost,
    rate_threshold,
    validate,
    violations,
)


def _population(n: int, seed: int):
    """Scores that rank the truth imperfectly: the transformer is clearly better on 60%."""
    rng = np.random.default_rng(seed)
    t_better = rng.random(n) < 0.6
    p = np.clip(np.where(t_better, 0.65, 0.4) + rng.normal(0, 0.15, n), 0, 1)
    lt = np.full(n, 4.0)
    lh = np.where(t_better, 4.0 + rng.uniform(0.1, 1.0, n), 4.0 - rng.uniform(0.1, 0.5, n))
    return p, lt, lh


def test_clopper_pearson_known_values() -> None:
    # 0 of 100: the exact one-sided 95% bound is 1 - 0.05 ** (1 / 100)
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** 0.01, rel=1e-9)
    assert clopper_pearson_upper(100, 100, 0.05) == 1.0
    assert clopper_pearson_upper(10, 100, 0.05) > 0.10  # an upper bound is above the rate
    assert clopper_pearson_upper(10, 1000, 0.05) < clopper_pearson_upper(1, 100, 0.05)


def test_rate_threshold_holds_alpha_with_confidence() -> None:
    """Calibrate on 1,000 draws, judge on a 200,000-draw population: the population
    violation rate exceeds alpha in at most about delta of the repetitions, and the
    threshold is not trivially 0 (it does send requests to the hybrid)."""
    P, LT, LH = _population(200_000, 1)
    rng = np.random.default_rng(2)
    exceed, shares = 0, []
    reps = 150
    for _ in range(reps):
        i = rng.choice(len(P), 1000, replace=False)
        t = rate_threshold(P[i], LT[i], LH[i], alpha=0.1, delta=0.1)
        exceed += violations(P, t, LT, LH).mean() > 0.1
        shares.append((P < t).mean())
    assert exceed / reps <= 0.1 + 0.05  # delta plus the sampling error of 150 repetitions
    assert np.mean(shares) > 0.2


def test_rate_threshold_is_monotone_in_alpha_and_safe_at_zero() -> None:
    p, lt, lh = _population(2000, 3)
    ts = [rate_threshold(p, lt, lh, a) for a in (0.01, 0.05, 0.1, 0.2, 0.4)]
    assert ts == sorted(ts)
    # a pool where every hybrid call is a violation and alpha is tiny: nothing to the hybrid
    assert rate_threshold(p, lt, lt + 1.0, alpha=1e-4) == 0.0
    with pytest.raises(ValueError):
        rate_threshold(p, lt, lh, alpha=0.0)


def test_crc_threshold_bounds_the_expected_loss() -> None:
    P, LT, LH = _population(200_000, 4)
    rng = np.random.default_rng(5)
    risks = []
    for _ in range(150):
        i = rng.choice(len(P), 500, replace=False)
        t = crc_threshold(P[i], LT[i], LH[i], alpha=0.05)
        risks.append(quality_lost(P, t, LT, LH).mean())
    assert np.mean(risks) <= 0.05 + 0.003  # in expectation, plus the mean's sampling error
    # the formula: the largest t with (n R(t) + B) / (n + 1) <= alpha
    p = np.array([0.1, 0.2, 0.3, 0.4])
    lt, lh = np.zeros(4), np.array([1.0, 0.0, 1.0, 0.0])
    # B = 1: t just above 0.2 routes two (loss 1) -> (1 + 1) / 5 = 0.4
    assert crc_threshold(p, lt, lh, alpha=0.4, bound=1.0) == pytest.approx(0.25)
    assert crc_threshold(p, lt, lh, alpha=0.39, bound=1.0) == pytest.approx(0.0)


def test_validate_reports_both_methods() -> None:
    p, lt, lh = _population(3000, 6)
    rows = validate(p, lt, lh, alphas=(0.1,), reps=20, n_cal=500)
    assert [r.method for r in rows] == ["rate", "mean"]
    assert all(r.n_cal == 500 and r.n_test == 2500 for r in rows)
    assert 0 < rows[0].hybrid_share < 1 and rows[0].mean_risk <= 0.1 + 0.02
