"""The learning loop's safety parts (#24): the guard (never below the best single backend),
the DR gate on held-back requests, and the loop's promote / refuse / rollback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from classifiers.request import RoutingRequest
from router.learning import gate as Gt
from router.learning import guard as G

COPY = "Repeat the following sentence exactly: the river rose slowly through the night {i}."
OPEN = "Write a short poem about winter mornings in the mountains, number {i}."


def traffic(n: int, copy_gap: float, open_gap: float, seed: int = 0, noise: float = 0.2):
    """Requests of two kinds (copying, open-ended) with given mean gaps (lt - lh)."""
    rng = np.random.default_rng(seed)
    copy = rng.random(n) < 0.5
    reqs = [RoutingRequest.from_prompt((COPY if c else OPEN).format(i=i))
            for i, c in enumerate(copy)]
    gap = np.where(copy, copy_gap, open_gap) + rng.normal(0, noise, n)
    lh = 1.0 + rng.random(n)
    return reqs, copy, gap, lh + gap, lh


def loss(act, lt, lh) -> float:
    return float(np.where(act == 1, lt, lh).mean())


def test_a_wrong_predictor_cannot_take_traffic_below_the_best_single_backend() -> None:
    reqs, _, gap, lt, lh = traffic(300, 0.3, 0.1)  # the hybrid better everywhere
    F = G.cluster_features(reqs)
    wrong = np.full(len(gap), -1.0)  # says: the transformer, by a lot
    g = G.Guard().fit(F, wrong, lt, lh)
    act = g.actions(F, wrong)
    assert g.global_.default == G.H and act.sum() == 0
    assert loss(act, lt, lh) <= min(lt.mean(), lh.mean()) + 1e-12


def test_each_cluster_gets_its_own_best_single_backend() -> None:
    reqs, copy, gap, lt, lh = traffic(400, -0.3, 0.3)
    F = G.cluster_features(reqs)
    noise = np.random.default_rng(1).normal(0, 0.5, len(gap))  # an uninformative predictor
    g = G.Guard().fit(F, noise, lt, lh)
    act = g.actions(F, noise)
    assert (act[copy] == 1).mean() > 0.95 and (act[~copy] == 0).mean() > 0.95
    oracle = np.minimum(lt, lh).mean()
    assert loss(act, lt, lh) < min(lt.mean(), lh.mean()) - 0.1  # 0.3 gained on half
    assert loss(act, lt, lh) - oracle < 0.1


def test_it_routes_away_only_where_the_lower_bound_of_the_gain_is_positive() -> None:
    reqs, _, gap, lt, lh = traffic(400, 0.0, 0.0, noise=0.4)  # mean 0: a tie on average
    F = G.cluster_features(reqs)
    informative = gap + np.random.default_rng(2).normal(0, 0.1, len(gap))
    g = G.Guard().fit(F, informative, lt, lh)
    assert any(c.tau is not None and c.switch_lcb > 0 for c in [g.global_, *g.clusters])
    act = g.actions(F, informative)
    assert loss(act, lt, lh) < min(lt.mean(), lh.mean()) - 0.05
    # a predictor of pure noise: nothing clears the bound, nobody is routed away
    noise = np.random.default_rng(3).normal(0, 0.4, len(gap))
    g2 = G.Guard().fit(F, noise, lt, lh)
    assert all(c.tau is None for c in g2.clusters)


def test_traffic_unlike_every_cluster_goes_to_the_best_single_backend() -> None:
    reqs, _, gap, lt, lh = traffic(200, 0.3, 0.3)
    F = G.cluster_features(reqs)
    g = G.Guard().fit(F, np.zeros(len(gap)), lt, lh)
    code = RoutingRequest.from_prompt("Fix the bug in this function and return the whole "
                                      "corrected function:\n\ndef add(a, b):\n    return a - b\n"
                                      "assert add(1, 2) == 3\n" * 3)
    Fo = G.cluster_features([code])
    assert g.assign(Fo)[0] == -1
    assert g.actions(Fo, np.array([-5.0]))[0] == g.global_.default == G.H


def test_guard_round_trips_and_refuses_what_is_not_a_guard(tmp_path: Path) -> None:
    reqs, _, gap, lt, lh = traffic(200, -0.3, 0.3)
    F = G.cluster_features(reqs)
    g = G.Guard().fit(F, gap, lt, lh)
    G.save(g, tmp_path)
    back = G.load(tmp_path)
    np.testing.assert_array_equal(back.actions(F, gap), g.actions(F, gap))
    assert G.load(tmp_path / "none") is None
    (tmp_path / G.GUARD_FILE).write_text(json.dumps({"format": 1, "clusters": []}))
    with pytest.raises(ValueError, match="not a guard"):
        G.load(tmp_path)
    (tmp_path / G.GUARD_FILE).write_text("[1, 2")
    with pytest.raises(ValueError, match="JSON"):
        G.load(tmp_path)
    with pytest.raises(ValueError, match="at least"):
        G.Guard().fit(F[:5], gap[:5], lt[:5], lh[:5])


# --- the gate ----------------------------------------------------------------------------

def test_dr_terms_with_measured_outcomes_give_the_exact_value() -> None:
    rng = np.random.default_rng(0)
    lt, lh = rng.random(50), rng.random(50)
    a = rng.integers(0, 2, 50)
    target = rng.integers(0, 2, 50)
    terms = Gt.dr_terms(a, np.full(50, 0.5), -np.where(a == 1, lt, lh), target, -lt, -lh)
    assert terms.mean() == pytest.approx(-np.where(target == 1, lt, lh).mean())


def _gate(serving, candidate, lt, lh, **kw):
    a = np.asarray(serving)
    return Gt.compare(serving, candidate, a, np.full(len(a), 0.9), -np.where(a == 1, lt, lh),
                      -lt, -lh, n_boot=500, **kw)


def test_gate_passes_a_better_candidate_and_refuses_the_rest() -> None:
    rng = np.random.default_rng(0)
    n = 200
    lt, lh = 1 + rng.random(n), 1 + rng.random(n)
    oracle = (lt < lh).astype(int)
    worst = 1 - oracle
    better = _gate(worst, oracle, lt, lh)
    assert better.passed and better.ci[0] > 0 and better.n_disagree == n
    worse = _gate(oracle, worst, lt, lh)
    assert not worse.passed and worse.ci[1] < 0 and "not better" in worse.reason
    same = _gate(oracle, oracle, lt, lh)
    assert not same.passed and "nothing to gain" in same.reason
    few = _gate(worst[:10], oracle[:10], lt[:10], lh[:10])
    assert not few.passed and "too few" in few.reason
    # a coin flip against itself: no evidence either way
    coin = rng.integers(0, 2, n)
    assert not _gate(coin, 1 - coin, np.ones(n), np.ones(n)).passed


def test_held_back_is_a_fixed_quarter_of_ids() -> None:
    ids = [f"chatcmpl-{i}" for i in range(4000)]
    share = np.mean([Gt.held_back(i) for i in ids])
    assert 0.22 < share < 0.28
    assert [Gt.held_back(i) for i in ids[:50]] == [Gt.held_back(i) for i in ids[:50]]


class _Const:
    def __init__(self, score: float) -> None:
        self.s = score

    def score_batch(self, reqs):
        return [self.s] * len(reqs)


def _log_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lt, lh = 2 + rng.random(), 1 + rng.random()  # the hybrid better
        out.append({"request_id": f"chatcmpl-{i}", "status": 200, "decision": "transformer",
                    "propensity": 0.9, "label_status": "done", "loss_transformer": lt,
                    "loss_hybrid": lh, "request": {"kind": "completion", "messages": [
                        {"role": "user", "content": f"question {i}"}]}})
    return out


def test_judge_on_log_rows_uses_only_held_back_labelled_requests() -> None:
    rows = _log_rows(200)
    rows[0]["fallback_from"] = "h-fake"  # left out whatever its id
    res = Gt.judge(rows, _Const(1.0), 0.5, _Const(0.0), 0.5)  # always-T -> always-H
    held = [r for r in rows[1:] if Gt.held_back(r["request_id"])]
    assert res.n == len(held) and res.passed and res.difference > 0.5
    assert not Gt.judge(rows, _Const(0.0), 0.5, _Const(1.0), 0.5).passed
