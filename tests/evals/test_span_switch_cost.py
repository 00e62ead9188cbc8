"""The switch-priced learned gate (``switch_cost``: hysteresis around the threshold) and the
frontier tool that chooses it on training sources (``evals.span.switch_cost``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evals.span.evaluate import rollout
from evals.span.score import ScoredSeq
from evals.span.switch_cost import choose, frontier, simulate
from models.span.learned import LearnedGate, load_learned_gate


def test_a_switch_must_pay_its_cost():
    """Score 0.3 nats against threshold 0: without a cost the transformer everywhere; with a
    cost of 0.5 the first token still goes by the threshold (transformer) and the
    transformer keeps it (0.3 > -0.5), but after a hybrid token the transformer would need
    more than 0.5 to take over."""
    g = LearnedGate({"bias": 0.3}, threshold=0.0, switch_cost=0.5)
    s = g.start([0, 5, 6])
    assert s.choose() == "transformer"
    s.push(7, "transformer", 1.0)
    assert s.choose() == "transformer"
    s.push(8, "hybrid", 1.0)
    assert s.choose() == "hybrid"
    low = LearnedGate({"bias": -0.3}, threshold=0.0, switch_cost=0.5).start([0, 5])
    low.push(7, "transformer", 1.0)
    assert low.choose() == "transformer"  # -0.3 > -0.5: staying is cheaper than switching
    free = LearnedGate({"bias": -0.3}, threshold=0.0).start([0, 5])
    free.push(7, "transformer", 1.0)
    assert free.choose() == "hybrid"


def test_switch_cost_in_the_artifact(tmp_path):
    g = LearnedGate({"bias": 0.1}, threshold=0.2, switch_cost=0.3)
    loaded = load_learned_gate(g.save(tmp_path))
    assert (loaded.threshold, loaded.switch_cost) == (0.2, 0.3)
    d = g.to_json()
    del d["switch_cost"]  # an artifact from before switch costs
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert load_learned_gate(tmp_path / "old.json").switch_cost == 0.0
    with pytest.raises(ValueError, match="switch_cost"):
        LearnedGate({}, switch_cost=-1)


def _seq(prompt, answer, lp_t, lp_h) -> ScoredSeq:
    n = len(answer)
    return ScoredSeq("r", "s", "src", "k", np.array(prompt, np.int32), np.array(answer, np.int32),
                     np.array([lp_t, lp_h], np.float32), np.ones((2, n), np.float32))


def _text(i: int) -> str:
    return f" w{i}"


def test_simulate_is_the_rollout_and_counts_verify_forwards():
    """Without drafting the simulated roles are span-eval's rollout and the transformer runs
    once per token it produces; with drafting a copied stretch the gate gives the transformer
    costs fewer forwards."""
    rng = np.random.default_rng(0)
    prompt = [0, *range(10, 30)]
    answer = [*range(10, 30), 99, 98, *range(10, 20)]  # copies the prompt, breaks, copies
    n = len(answer)
    seq = _seq(prompt, answer, rng.normal(-2, 1, n), rng.normal(-2, 1, n))
    gate = LearnedGate({"match_len": 1.0}, threshold=0.5)  # the transformer on a match
    roles, fw = simulate(gate, seq, _text, 0, 2)
    assert (roles == rollout(gate, seq, _text)).all() and fw == int(roles.sum()) > 10
    roles_d, fw_d = simulate(gate, seq, _text, 8, 2)
    assert (roles_d == roles).all() and 0 < fw_d < fw // 3


def test_frontier_costs_trade_switches_for_loss_and_the_choice_rule():
    rng = np.random.default_rng(1)
    seqs = []
    for _ in range(20):
        prompt = [0, *rng.integers(10, 60, 30).tolist()]
        answer = rng.integers(10, 60, 60).tolist()
        seqs.append(_seq(prompt, answer, rng.normal(-3, 1, 60), rng.normal(-3, 1, 60)))
    gate = LearnedGate({"ent_last": 1.0, "match_len": 0.4}, threshold=1.2)
    fc = {"t_decode": 1.0, "t_catchup": 1.5, "t_verify": 1.2, "h_decode": 1.6, "h_catchup": 2.6}
    rows = frontier(gate, seqs, _text, [0.0, 0.5, 2.0], fc, 8, 2)
    assert gate.switch_cost == 0.0  # restored
    sw = [r["switches_100"] for r in rows]
    assert sw[0] > sw[1] >= sw[2]  # a higher cost, fewer switches
    assert all(r["tokens"] == 1200 for r in rows)
    rows = [{"switch_cost": 0.0, "loss": 3.0}, {"switch_cost": 0.5, "loss": 3.004},
            {"switch_cost": 1.0, "loss": 3.02}]
    assert choose(rows, 0.005)["switch_cost"] == 0.5
    assert choose(rows, 0.001)["switch_cost"] == 0.0
