"""Each metric on a small hand-computed table (see the numbers in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evals.harness import metrics as M

# quality (T, H) per request; the transformer costs 2, the hybrid 1.
#  r0, r1: the transformer is better by 1;  r2: the hybrid by 1;  r3: a tie (-> the cheaper hybrid)
Q = np.array([[0.0, -1.0], [0.0, -1.0], [-1.0, 0.0], [-0.5, -0.5]])
C = np.array([[2.0, 1.0]] * 4)
# singles: Q_T = -0.375, Q_H = -0.625, C_T = 2, C_H = 1; oracle: Q = -0.125, C = 1.5
PERFECT = np.array([0.9, 0.8, 0.1, 0.2])


def test_oracle_choice_and_scores() -> None:
    assert M.oracle_choice(Q, C).tolist() == [True, True, False, False]
    s = M.oracle_scores(Q, C)
    assert (s[:2] > 0.5).all() and (s[2:] < 0.5).all()


def test_sweep_points() -> None:
    cv = M.sweep(PERFECT, Q, C)
    assert cv.share_t.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose(cv.quality, [-0.625, -0.375, -0.125, -0.125, -0.375])
    np.testing.assert_allclose(cv.cost, [1.0, 1.25, 1.5, 1.75, 2.0])
    assert cv.thresholds[0] == np.inf and cv.thresholds[1] == 0.9


def test_sweep_ties_move_together() -> None:
    cv = M.sweep(np.ones(4), Q, C)
    assert cv.share_t.tolist() == [0.0, 1.0]


def test_pareto_and_hull() -> None:
    cost, q = np.array([1.0, 2.0, 3.0, 1.5]), np.array([1.0, 0.0, 2.0, 1.0])
    assert M.pareto_front(cost, q).tolist() == [0, 2]
    hx, hy = M.upper_hull(np.array([1.0, 1.25, 1.5, 1.75, 2.0]),
                          np.array([-0.625, -0.375, -0.125, -0.125, -0.375]))
    assert hx.tolist() == [1.0, 1.5, 1.75, 2.0]  # (1.25) is collinear, dropped
    assert hy.tolist() == [-0.625, -0.125, -0.125, -0.125]  # non-decreasing


def test_apgr_aiq_hand_computed() -> None:
    cv = M.sweep(PERFECT, Q, C)
    # PGR = (Q - Q_H) / 0.25 = [0, 1, 2, 2, 1] at x = 0, .25, .5, .75, 1 -> trapezoid 1.375
    assert M.apgr(cv, -0.375, -0.625) == pytest.approx(1.375)
    # hull mean over [1, 2]: 0.5 * mean(-0.625, -0.125) + 0.5 * -0.125 = -0.25
    assert M.aiq(cv, ((-0.375, 2.0), (-0.625, 1.0))) == pytest.approx(-0.25)


def test_single_backend_and_random_mixing_give_half() -> None:
    cv = M.sweep(np.ones(4), Q, C)
    assert M.apgr(cv, -0.375, -0.625) == pytest.approx(0.5)
    m = M.policy_metrics(np.ones(4), np.ones(4, bool), Q, C)
    assert m["aiq_norm"] == pytest.approx(0.5)


def test_cost_to_reach() -> None:
    cv = M.sweep(PERFECT, Q, C)
    # oracle gain over the cheap hybrid: -0.125 - -0.625 = 0.5
    assert M.cost_to_reach(cv, -0.625 + 0.25) == pytest.approx(1.25)  # 50%: at a sweep point
    assert M.cost_to_reach(cv, -0.625 + 0.4) == pytest.approx(1.4)  # 80%: 0.6 along a segment
    assert math.isnan(M.cost_to_reach(cv, 1.0))


def test_policy_metrics_planted_oracle() -> None:
    m = M.policy_metrics(PERFECT, PERFECT >= 0.5, Q, C)
    assert m["gap_recovered"] == pytest.approx(1.0)
    assert m["accuracy"] == 1.0 and m["auc"] == 1.0
    assert m["quality"] == pytest.approx(-0.125) and m["cost"] == pytest.approx(1.5)
    assert m["cost_to_50"] == pytest.approx(1.25) and m["cost_to_50_rel"] == pytest.approx(0.25)
    assert m["cost_to_80"] == pytest.approx(1.4) and m["cost_to_80_rel"] == pytest.approx(0.4)
    assert m["aiq_norm"] == pytest.approx((-0.25 + 0.625) / 0.25)


def test_single_backend_policies_gap_recovered() -> None:
    t = M.policy_metrics(np.ones(4), np.ones(4, bool), Q, C)
    h = M.policy_metrics(np.zeros(4), np.zeros(4, bool), Q, C)
    assert t["gap_recovered"] == 0.0  # identical to the best single backend
    assert h["gap_recovered"] == pytest.approx(-1.0)  # (-0.625 + 0.375) / 0.25
    assert t["share_transformer"] == 1.0 and h["share_transformer"] == 0.0
    assert t["auc"] == 0.5 and t["accuracy"] == 0.5
    assert math.isnan(t["cost_to_80"])  # always-transformer never reaches 80% of the gain


def test_oracle_policy_gets_one() -> None:
    s = M.oracle_scores(Q, C)
    m = M.policy_metrics(s, s >= 0.5, Q, C)
    assert m["gap_recovered"] == pytest.approx(1.0) and m["accuracy"] == 1.0


def test_auc_ties_count_half() -> None:
    assert M.auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert M.auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.6])) == 0.75
    assert math.isnan(M.auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_bootstrap_intervals() -> None:
    rng = np.random.default_rng(1)
    q = rng.normal(size=(200, 2))
    c = np.tile([2.0, 1.0], (200, 1))
    s = M.oracle_scores(q, c)
    est, idx = M.bootstrap(lambda i: M.policy_metrics(s[i], s[i] >= 0.5, q[i], c[i]), 200, 200, 0)
    assert idx.shape == (200, 200)
    g = est["gap_recovered"]
    assert g.value == pytest.approx(1.0) and g.lo == pytest.approx(1.0) and g.hi == pytest.approx(1.0)
    qe = est["quality"]
    assert qe.lo < qe.value < qe.hi
    rnd = rng.random(200)
    est2, _ = M.bootstrap(lambda i: M.policy_metrics(rnd[i], rnd[i] >= 0.5, q[i], c[i]), 200, 200, 0)
    assert est2["auc"].lo < 0.5 < est2["auc"].hi  # a coin flip: AUC's interval covers 0.5
