"""Off-policy estimators (evals/ope.py) on logs whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from evals.ope import coverage, estimate, logging_propensities, simulate


def _data(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    lt = rng.uniform(3, 5, n)
    lh = lt + rng.normal(0.2, 0.6, n)
    choice = (lh - lt + rng.normal(0, 0.5, n) > 0).astype(int)  # a decent logging router
    return lt, lh, choice


def test_ips_and_dr_are_unbiased_over_simulated_logs() -> None:
    lt, lh, choice = _data()
    target = 1 - choice  # disagrees with the logging router everywhere: only exploration sees it
    truth = -np.where(target == 1, lt, lh).mean()
    q_t, q_h = -np.full(len(lt), lt.mean()), -np.full(len(lt), lh.mean())  # a crude model
    vals: dict[str, list[float]] = {"ips": [], "snips": [], "dr": []}
    for r in range(300):
        log = simulate(lt, lh, choice, epsilon=0.2, seed=r)
        for k, e in estimate(log["action"], log["propensity"], log["reward"], target, q_t, q_h,
                             n_boot=0).items():
            vals[k].append(e.value)
    assert np.mean(vals["ips"]) == pytest.approx(truth, abs=0.05)
    assert np.mean(vals["dr"]) == pytest.approx(truth, abs=0.05)
    assert np.std(vals["dr"]) < np.std(vals["ips"])  # the direct model removes variance


def test_dr_with_the_true_model_is_exact() -> None:
    lt, lh, choice = _data()
    target = np.ones(len(lt), int)
    log = simulate(lt, lh, choice, epsilon=0.1, seed=1)
    e = estimate(log["action"], log["propensity"], log["reward"], target, -lt, -lh, n_boot=50)
    assert e["dr"].value == pytest.approx(-lt.mean(), abs=1e-12)


def test_deterministic_log_has_no_overlap_for_a_disagreeing_target() -> None:
    lt, lh, choice = _data()
    log = simulate(lt, lh, choice, epsilon=0.0, seed=0)
    assert np.all(log["propensity"] == 1.0)
    e = estimate(log["action"], log["propensity"], log["reward"], 1 - choice, n_boot=0)
    assert e["ips"].value == 0.0 and e["ips"].ess == 0.0  # nothing observed: no information
    assert np.isnan(e["snips"].value)


def test_ess_and_propensities() -> None:
    p_t, p_h = logging_propensities(np.array([1, 0, 1]), 0.1)
    assert p_t.tolist() == [0.9, 0.1, 0.9] and np.allclose(p_t + p_h, 1)
    e = estimate([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1], n_boot=0)
    assert e["ips"].value == pytest.approx((2 * 1.0 + 2 * 2.0) / 4)
    assert e["snips"].value == pytest.approx(1.5)
    assert e["ips"].ess == pytest.approx(2.0)
    with pytest.raises(ValueError, match="propensities"):
        estimate([1], [0.0], [1.0], [1])
    with pytest.raises(ValueError, match="empty"):
        estimate([], [], [], [])


@pytest.mark.slow
def test_dr_intervals_cover_the_truth() -> None:
    """The issue's bar on simulated logs: DR's 95% CI holds the truth in >= 90% of logs."""
    lt, lh, choice = _data(n=600, seed=3)
    q_t, q_h = -np.full(len(lt), lt.mean()), -np.full(len(lt), lh.mean())
    targets = {"always-transformer": np.ones(len(lt), int), "flip": 1 - choice}
    res = coverage(lt, lh, choice, targets, q_t, q_h, epsilon=0.1, reps=60, n_boot=200,
                   reward_noise=0.3)
    for name in targets:
        assert res[name]["dr"]["coverage"] >= 0.9, res[name]
