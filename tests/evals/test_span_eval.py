"""Teacher-forced span evaluation: rollouts are causal, the baselines and the counts match
hand-computed numbers, the learned gate round-trips, scoring matches ``backend.score``, and
the CLI fails cleanly."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from evals.span.evaluate import (
    PolicyStats,
    baseline_stats,
    compare,
    gate_stats,
    role_stats,
    rollout,
    summarize,
)
from evals.span.score import ScoredSeq, load_seq, save_seq
from evals.span.train import best_threshold, collect, fit_weights, train_gate
from models.span.gates import Gate, GateState, get_gate
from models.span.learned import (
    FEATURES,
    LearnedGate,
    LearnedState,
    load_learned_gate,
    token_class,
)


def seq(lp_t, lp_h, prompt=(0, 5, 6), answer=None, ent=None, source="s", sid="r") -> ScoredSeq:
    lp = np.array([lp_t, lp_h], np.float32)
    n = lp.shape[1]
    ans = np.arange(10, 10 + n, dtype=np.int32) if answer is None else np.array(answer, np.int32)
    e = np.ones((2, n), np.float32) if ent is None else np.array(ent, np.float32)
    return ScoredSeq(sid, "t", source, "k", np.array(prompt, np.int32), ans, lp, e)


@dataclass(frozen=True)
class LinearCost:
    per_token: float

    def prefill_flops(self, n: int) -> float:
        return self.per_token * n


class Costs:  # CostModels with linear costs: transformer 2 per token, hybrid 1
    pair = (LinearCost(2.0), LinearCost(1.0))
    big = (LinearCost(20.0), LinearCost(10.0))


# ---- baselines and counts -----------------------------------------------------------------

def test_baselines_by_hand() -> None:
    a = seq([-1.0, -2.0, -3.0], [-2.0, -1.0, -1.0])
    b = seq([-0.5], [-1.5], sid="r2")
    st = baseline_stats([a, b])
    assert st["always-transformer"].nll.tolist() == [6.0, 0.5]
    assert st["always-hybrid"].nll.tolist() == [4.0, 1.5]
    assert st["request-oracle"].nll.tolist() == [4.0, 0.5]  # H for a, T for b
    assert st["token-oracle"].nll.tolist() == [3.0, 0.5]
    mix_a = -sum(math.log(0.5 * math.exp(x) + 0.5 * math.exp(y))
                 for x, y in ((-1, -2), (-2, -1), (-3, -1)))
    assert st["mixture-50/50"].nll[0] == pytest.approx(mix_a, rel=1e-6)
    s = summarize(st, n_boot=0)
    assert s["always-transformer"]["loss"][0] == pytest.approx(6.5 / 4)  # tokens pooled
    assert s["always-transformer"]["loss_req"][0] == pytest.approx((2.0 + 0.5) / 2)  # per request
    assert s["request-oracle"]["loss"][0] == pytest.approx(4.5 / 4)
    assert s["token-oracle"]["gain"][0] == pytest.approx((4.5 - 3.5) / 4)
    assert s["request-oracle"]["share_t"] == pytest.approx(1 / 4)
    assert s["token-oracle"]["share_t"] == pytest.approx(2 / 4)  # T, H, H | T
    assert s["mixture-50/50"]["share_t"] is None


def test_switches_catchup_and_flops_by_hand() -> None:
    roles = np.array([True, True, False, False, True])  # T T H H T
    lp = np.array([[-1.0] * 5, [-2.0] * 5])
    nll, n, n_t, switches, catchup, flops, flops_7b = role_stats(roles, lp, 4, Costs)
    assert (nll, n, n_t, switches) == (7.0, 5, 3, 2)
    # H takes over at 2: catches up T's tokens 0-1 (2); T takes over at 4: H's 2-3 (2)
    assert catchup == 4
    # T processes the prompt + answer tokens 0..3 (8), H the prompt + 0..2 (7)
    assert flops == 2.0 * 8 + 1.0 * 7
    assert flops_7b == 20.0 * 8 + 10.0 * 7
    # one model only: no catch-up; the other model costs nothing
    assert role_stats(np.ones(5, bool), lp, 4, Costs)[4:] == (0, 2.0 * 8, 20.0 * 8)
    # the hybrid first, the transformer joins at the last token: catches up all 4 tokens
    assert role_stats(np.array([False] * 4 + [True]), lp, 4, Costs)[4] == 4


def test_mixture_costs_both_models_and_summaries_report_rates() -> None:
    a = seq([-1.0, -1.0], [-2.0, -2.0], prompt=(0, 1, 2))
    st = baseline_stats([a], Costs)
    assert st["mixture-50/50"].flops[0] == 2.0 * 4 + 1.0 * 4
    assert st["always-transformer"].flops[0] == 2.0 * 4
    s = summarize(st, n_boot=0)
    assert s["mixture-50/50"]["flops_rel"] == pytest.approx(1.5)
    assert s["always-hybrid"]["flops_rel"] == pytest.approx(0.5)


def test_bootstrap_cis_and_paired_compare() -> None:
    rng = np.random.default_rng(0)
    seqs = [seq(rng.normal(-2, 1, 20), rng.normal(-2.2, 1, 20), sid=f"r{i}") for i in range(30)]
    st = baseline_stats(seqs)
    s = summarize(st, n_boot=200)
    for row in s.values():
        v, lo, hi = row["loss"]
        assert lo <= v <= hi
    d = compare(st, "token-oracle", "request-oracle", 200)
    assert d[0] == pytest.approx(s["token-oracle"]["gain"][0]) and d[1] > 0
    assert compare(st, "request-oracle", "request-oracle", 200)[:3] == [0.0, 0.0, 0.0]


# ---- causality ------------------------------------------------------------------------------

class Recording(Gate):
    """Checks at every choose() that the state holds exactly the prompt and the answer so
    far, and records what it was pushed."""

    name = "recording"

    def __init__(self, answer, prompt) -> None:
        self.answer, self.prompt, self.pushed = list(answer), list(prompt), []

    def start(self, prompt_ids, token_text=None) -> GateState:
        gate = self

        class S(GateState):
            def choose(self):
                assert self.matcher.ids == gate.prompt + gate.answer[:self.step]
                return "transformer" if self.step % 2 == 0 else "hybrid"

            def push(self, token_id, role, entropy=None):
                gate.pushed.append((token_id, role, entropy))
                super().push(token_id, role, entropy)

        return S(prompt_ids, token_text)


def test_rollout_is_causal_and_pushes_the_chosen_models_entropy() -> None:
    s = seq([-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0], answer=[7, 8, 9],
            ent=[[0.1, 0.2, 0.3], [1.1, 1.2, 1.3]])
    g = Recording([7, 8, 9], [0, 5, 6])
    roles = rollout(g, s)
    assert roles.tolist() == [True, False, True]
    assert g.pushed == [(7, "transformer", pytest.approx(0.1)), (8, "hybrid", pytest.approx(1.2)),
                        (9, "transformer", pytest.approx(0.3))]


class Cheat(Gate):
    """A gate handed the answer: picks the model that is better on the token it is about to
    choose for. It reaches the token-oracle's loss, which no causal gate can."""

    name = "cheat"

    def __init__(self, seqs) -> None:
        self.by_prompt = {tuple(s.prompt_ids.tolist()): s for s in seqs}

    def start(self, prompt_ids, token_text=None) -> GateState:
        s = self.by_prompt[tuple(prompt_ids)]

        class S(GateState):
            def choose(self):
                i = self.step
                return "transformer" if s.lp[0, i] >= s.lp[1, i] else "hybrid"

        return S(prompt_ids, token_text)


class PrevBest(Gate):
    """The causal counterpart: the model that was better on the previous token (what a gate
    could at best infer after the fact); here it reads it from the answer so far."""

    name = "prev"

    def __init__(self, seqs) -> None:
        self.by_prompt = {tuple(s.prompt_ids.tolist()): s for s in seqs}

    def start(self, prompt_ids, token_text=None) -> GateState:
        s = self.by_prompt[tuple(prompt_ids)]

        class S(GateState):
            def choose(self):
                i = self.step - 1
                return "transformer" if i < 0 or s.lp[0, i] >= s.lp[1, i] else "hybrid"

        return S(prompt_ids, token_text)


def test_a_cheating_gate_reaches_the_token_oracle_and_a_causal_one_does_not() -> None:
    rng = np.random.default_rng(1)
    seqs = [seq(rng.normal(-2, 1, 40), rng.normal(-2, 1, 40), prompt=(0, i)) for i in range(5)]
    st = baseline_stats(seqs)
    st.update(gate_stats({"cheat": Cheat(seqs), "prev": PrevBest(seqs)}, seqs))
    assert st["cheat"].nll.sum() == pytest.approx(st["token-oracle"].nll.sum())
    assert st["prev"].nll.sum() > st["token-oracle"].nll.sum() + 1.0


def test_copy_gate_lags_by_one_token() -> None:
    # prompt 1 2 3; answer 1 2 3: the match that puts copy-2 on the transformer exists only
    # once two answer tokens are in (after pushing 1, 2), so only the 3rd token goes to T
    s = seq([-1.0] * 3, [-2.0] * 3, prompt=(0, 1, 2, 3), answer=[1, 2, 3])
    assert rollout(get_gate("copy-2"), s).tolist() == [False, False, True]
    assert rollout(get_gate("copy-1"), s).tolist() == [False, True, True]


def test_unknown_role_is_an_error() -> None:
    class Bad(Gate):
        name = "bad"

        def start(self, prompt_ids, token_text=None):
            class S(GateState):
                def choose(self):
                    return "mamba"

            return S(prompt_ids)

    with pytest.raises(ValueError, match="mamba"):
        rollout(Bad(), seq([-1.0], [-1.0]))


# ---- the learned gate -----------------------------------------------------------------------

def test_token_class() -> None:
    assert [token_class(t) for t in ("\n", "  ", "(", "])", " 12", ",", " the", "ing", "", "\ufffd")] \
        == ["newline", "space", "open", "close", "digit", "punct", "word", "piece", "other", "other"]


def _planted(n_req: int = 12, n: int = 30, seed: int = 0) -> list[ScoredSeq]:
    """Copying answers: the transformer is better on tokens that continue a match."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(n_req):
        prompt = [0, *rng.integers(20, 60, 15).tolist()]
        answer = prompt[1:] + rng.integers(60, 100, n - 15).tolist()
        lp_t = np.r_[np.full(15, -0.5), np.full(n - 15, -3.0)] + rng.normal(0, 0.1, n)
        lp_h = np.r_[np.full(15, -2.0), np.full(n - 15, -2.0)] + rng.normal(0, 0.1, n)
        out.append(seq(lp_t, lp_h, prompt=prompt, answer=answer, source=f"src{r % 3}", sid=f"r{r}"))
    return out


def text(i: int) -> str:
    return " w" if i % 7 else "\n"


def test_learned_gate_learns_a_planted_copy_signal_and_round_trips(tmp_path: Path) -> None:
    seqs = _planted()
    gate = train_gate(seqs, text, rounds=2, meta={"note": "test"})
    again = train_gate(seqs, text, rounds=2, meta={"note": "test"})
    assert gate.to_json() == again.to_json()  # deterministic
    st = baseline_stats(seqs)
    st.update(gate_stats({"learned": gate, "copy-2": get_gate("copy-2")}, seqs, text))
    s = summarize(st, n_boot=0)
    assert s["learned"]["gain"][0] > 0.5  # well above the request oracle
    path = gate.save(tmp_path / "g")
    assert path.name == "gate.json" and path.stat().st_size < 200_000
    back = load_learned_gate(tmp_path / "g")
    assert back.weights == gate.weights and back.threshold == gate.threshold
    assert back.meta["note"] == "test" and back.name == f"learned:{tmp_path / 'g'}"
    assert get_gate(f"learned:{path}").weights == gate.weights
    st2 = gate_stats({"back": back}, seqs, text)["back"]
    assert st2.nll.tolist() == st["learned"].nll.tolist()


def test_shipped_gate_loads_and_chooses() -> None:
    """The shipped gate loads with its provenance and decides token by token (its speed is
    a benchmark's business, `archroute bench span`, not a timed unit test)."""
    g = get_gate("learned")
    assert isinstance(g, LearnedGate) and g.name == "learned"
    assert set(g.weights) <= set(FEATURES)
    meta = g.meta
    assert meta["trained_on"] and all(f["sha256"] and f["license"] for f in meta["trained_on"])
    assert not any(f["eval_only"] for f in meta["trained_on"])
    assert not any(r in f["file"] for f in meta["trained_on"] for r in ("arena", "gsm8k", "humaneval"))
    corpus = [f for f in meta["trained_on"] if f.get("split")]  # the reference corpus: train only
    assert corpus and all(f["split"] == "train" and "val" not in Path(f["file"]).name for f in corpus)
    st = g.start([0, *range(20, 60)], text)
    roles = []
    for t in range(20, 60):
        roles.append(st.choose())
        st.push(t, "transformer", 1.0)
    assert set(roles) <= {"transformer", "hybrid"}
    assert roles[-1] == "transformer"  # the prompt's tokens repeated: an induction match


def test_artifact_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no learned gate"):
        load_learned_gate(tmp_path)
    (tmp_path / "gate.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a learned span gate"):
        load_learned_gate(tmp_path)
    with pytest.raises(ValueError, match="unknown features"):
        LearnedGate({"nope": 1.0})


def test_features_are_causal_and_named() -> None:
    st = LearnedState(LearnedGate({}), [0, 1, 2, 3], text)
    f0 = st.features()
    assert f0["first"] == 1.0 and "match=1" not in f0 and set(f0) <= set(FEATURES)
    st.push(1, "hybrid", 2.5)
    st.push(2, "hybrid", 0.5)
    f = st.features()
    assert f["match=2"] == 1.0 and f["match_in_prompt"] == 1.0 and f["copy_hit"] == 1.0
    assert f["ent_h"] == 0.5 and "last_t" not in f and f["log_run"] == pytest.approx(math.log(2))


def test_version_2_features_emulate_copy_k_and_read_the_layout() -> None:
    def txt(i: int) -> str:
        return {0: "", 1: "def", 2: " f", 3: "(", 4: "):", 5: "\n", 6: "    ", 7: " return", 8: " x"}.get(i, " w")

    prompt = [0, 1, 2, 3, 4, 5, 6, 7, 8, 5]  # "def f():\n     return x\n"
    st = LearnedState(LearnedGate({}), prompt, txt)
    f = st.features()
    assert "indent" not in f and "col" not in f  # at a line start
    assert f["match_len"] == 1.0 and f["pred=space"] == 1.0  # the prompt's first "\n" went on with "    "
    assert f["prompt_nl"] == pytest.approx(2 / 10) and f["prompt_indent"] == pytest.approx(1 / 2)
    st.push(1, "hybrid", 2.0)  # "def": matches the prompt's "def", which continued with " f"
    f = st.features()
    assert f["match_len"] == 1.0 and f["match=1"] == 1.0 and f["pred=word"] == 1.0
    assert f["col"] == pytest.approx(math.log(2)) and f["ent_last"] == 2.0 and "copy_hit" not in f
    st.push(2, "transformer", 0.5)  # " f": the match continues (length 2, "(" next)
    f = st.features()
    assert f["match_len"] == 2.0 and f["pred=open"] == 1.0 and f["copy_hit"] == 1.0
    assert f["log_hit_run"] == pytest.approx(math.log(2)) and f["ent_last"] == 0.5
    for t in (3, 4, 5, 6):  # "():\n    "
        st.push(t, "transformer", 0.5)
    f = st.features()
    assert f["indent"] == 1.0 and f["match_len"] == 6.0 and f["answer_nl"] == pytest.approx(1 / 6)
    assert f["log_hit_run"] == pytest.approx(math.log(6)) and set(f) <= set(FEATURES)
    # numeric match length: one split at 1.5 is copy-2
    tree = (["match_len", None, None], [1.5, 0.0, 0.0], [1, -1, -1], [2, -1, -1], [0.0, -1.0, 1.0])
    g = LearnedGate({}, 0.0, trees=[tree])
    s = _planted(2)
    assert (rollout(g, s[0], text) == rollout(get_gate("copy-2"), s[0], text)).all()


def test_fit_and_threshold_helpers() -> None:
    rng = np.random.default_rng(0)
    X = np.zeros((500, len(FEATURES)))
    X[:, FEATURES.index("bias")] = 1.0
    X[:, FEATURES.index("log_step")] = rng.uniform(0, 3, 500)
    d = 2.0 * X[:, FEATURES.index("log_step")] - 1.0
    w = fit_weights(X, d, l2=0.0)
    assert w["bias"] == pytest.approx(-1.0, abs=1e-6) and w["log_step"] == pytest.approx(2.0)
    score = np.array([3.0, 2.0, 1.0, 0.0])
    assert best_threshold(score, np.array([1.0, 1.0, -1.0, -1.0])) == 1.5
    assert best_threshold(score, -np.ones(4)) > 3.0
    assert best_threshold(score, np.ones(4)) < 0.0


def test_collect_follows_copy2_then_the_gate() -> None:
    seqs = _planted(3)
    data = collect(seqs, text)
    assert data.X.shape == (90, len(FEATURES)) and len(data.d) == 90
    assert set(data.group) == {"src0", "src1", "src2"}


# ---- cache, real pair, CLI -----------------------------------------------------------------

def test_cache_round_trip(tmp_path: Path) -> None:
    s = seq([-1.0, -2.0], [-2.0, -1.0], ent=[[0.5, 0.6], [0.7, 0.8]])
    save_seq(tmp_path / "a.npz", s)
    back = load_seq(tmp_path / "a.npz")
    assert back is not None and back.meta == s.meta
    assert np.array_equal(back.lp, s.lp) and np.array_equal(back.prompt_ids, s.prompt_ids)
    (tmp_path / "b.npz").write_bytes(b"torn")
    assert load_seq(tmp_path / "b.npz") is None and load_seq(tmp_path / "c.npz") is None


@pytest.mark.slow
def test_scores_match_backend_score_on_the_reference_pair(reference_pair, tmp_path, monkeypatch) -> None:
    from classifiers.training.labels import fit_to_context
    from evals.harness.scoring import prompt_text
    from evals.harness.suites import EvalRequest
    from evals.span import score as S
    from models.base import ChatMessage

    t, h = reference_pair
    reqs = [EvalRequest("a", prompt="def add(a, b):\n", reference="    return a + b\n"),
            EvalRequest("b", messages=(ChatMessage("user", "Repeat exactly: one two three"),),
                        reference="one two three")]
    seqs = S.score_suite(reqs, "tiny", t, h, tmp_path, progress=False)
    for r, s in zip(reqs, seqs, strict=True):
        p = prompt_text(t, r)
        a, _ = fit_to_context(t, p, r.reference)
        for row, b in enumerate((t, h)):
            ref = b.score(p, a)
            assert s.answer_ids.tolist() == ref.token_ids
            assert np.allclose(s.lp[row], ref.logprobs, atol=1e-4)
        assert s.prompt_ids.tolist() == [t.prefix_id, *t.encode(p)]
        assert (s.ent > 0).all() and (s.ent <= math.log(len(t.tokenizer)) + 1e-4).all()

    def boom(*a, **k):
        raise AssertionError("rescored a cached request")

    monkeypatch.setattr(S, "forward_scores", boom)
    again = S.score_suite(reqs, "tiny", t, h, tmp_path, progress=False)
    assert [np.array_equal(x.lp, y.lp) for x, y in zip(again, seqs, strict=True)] == [True, True]


def _cli(args, capsys) -> tuple[int, str]:
    from router.cli import main

    rc = main(["span-eval", *args])
    return rc, capsys.readouterr().err


def test_cli_errors(capsys, tmp_path: Path) -> None:
    rc, err = _cli(["--gates", "copy-9"], capsys)
    assert rc == 2 and "unknown gate 'copy-9'" in err and "copy-2" in err
    rc, err = _cli(["--gates", f"learned:{tmp_path}"], capsys)
    assert rc == 2 and "no learned gate" in err
    rc, err = _cli(["--suites", "nonsense", "--gates", "copy-2"], capsys)
    assert rc == 2 and "unknown suite 'nonsense'" in err
    rc, err = _cli(["--per-source", "0"], capsys)
    assert rc == 2 and "--per-source" in err
    rc, err = _cli(["--report-only", str(tmp_path)], capsys)
    assert rc == 2 and "no results" in err
    rc, err = _cli(["--train-corpus-per-domain", "0"], capsys)
    assert rc == 2 and "--train-corpus-per-domain" in err
    rc, err = _cli(["--train-functions", "-1"], capsys)
    assert rc == 2 and "--train-functions" in err


def test_policy_stats_take() -> None:
    st = PolicyStats(*(np.arange(3.0) for _ in range(7)))
    assert st.take(np.array([2])).nll.tolist() == [2.0]


def test_exported_trees_match_lightgbm_and_the_per_token_score() -> None:
    import lightgbm as lgb

    from evals.span.train import _export, predict_matrix

    rng = np.random.default_rng(0)
    X = np.zeros((400, len(FEATURES)))
    cols = [FEATURES.index(f) for f in ("log_step", "ent_t", "match=2", "copy_share")]
    X[:, cols] = rng.uniform(0, 3, (400, 4)) * (rng.random((400, 4)) < 0.6)
    d = X[:, cols[0]] - 2 * (X[:, cols[2]] > 1) + rng.normal(0, 0.1, 400)
    params = {"objective": "regression", "num_leaves": 4, "min_data_in_leaf": 20,
              "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(X, d), num_boost_round=5)
    gate = LearnedGate({}, trees=[_export(t["tree_structure"]) for t in booster.dump_model()["tree_info"]])
    assert gate.kind == "trees"
    assert np.allclose(predict_matrix(gate, X), booster.predict(X), atol=1e-5)
    sparse = [{FEATURES[j]: v for j, v in enumerate(row) if v} for row in X[:50]]
    assert np.allclose([gate.predict(f) for f in sparse], predict_matrix(gate, X[:50]))


def test_linear_and_tree_gates_both_round_trip(tmp_path: Path) -> None:
    seqs = _planted()
    for model in ("linear", "trees"):
        g = train_gate(seqs, text, rounds=1, model=model, trees={"n_trees": 5, "leaves": 4,
                                                                 "min_leaf": 10})
        assert g.kind == model and g.meta["model"] == model
        back = load_learned_gate(g.save(tmp_path / model))
        assert back.to_json() == g.to_json()
    with pytest.raises(ValueError, match="linear or trees"):
        train_gate(seqs, text, model="forest")


def test_copy_k_folds_pick_the_k_that_is_best_on_the_other_sources() -> None:
    from evals.span.run import copy_k_folds

    seqs = _planted()
    folds, full = copy_k_folds(seqs, text)
    assert set(folds) == {"src0", "src1", "src2"}

    def loss(k: int, keep) -> float:
        st = gate_stats({"g": get_gate(f"copy-{k}")}, [s for s in seqs if keep(s)], text)["g"]
        return float(st.nll.sum())

    for src, g in folds.items():
        others = [loss(k, lambda s, src=src: s.source != src) for k in range(1, 9)]
        assert g.name == f"copy-{int(np.argmin(others)) + 1}"
    assert full.name == f"copy-{int(np.argmin([loss(k, lambda s: True) for k in range(1, 9)])) + 1}"


@pytest.mark.slow
def test_run_and_report_end_to_end(reference_pair, tmp_path: Path) -> None:
    from evals.span.report import write_report
    from evals.span.run import SpanConfig, run_span_eval

    suite = tmp_path / "tiny.jsonl"
    rows = [{"id": f"r{i}", "prompt": f"Repeat: alpha beta {i} gamma\n", "domain": d,
             "reference": f"alpha beta {i} gamma and more words here {i}"}
            for i, d in enumerate(["a", "a", "b", "b"])]
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SpanConfig(suites=[str(suite)], gates=["copy-2", "learned"], bootstrap=20,
                     out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    res = run_span_eval(cfg, progress=False, argv=["archroute", "span-eval"], pair=reference_pair)
    r = res["suites"]["tiny"]
    assert r["requests"] == 4 and set(r["by_source"]) == {"a", "b"}
    assert {"copy-2", "learned", "request-oracle", "mixture-50/50"} <= set(r["policies"])
    assert r["bar"]["best_gate"] in ("copy-2", "learned") and r["bar"]["learned"] == "learned"
    paths = write_report(res, cfg.out)
    md = Path(paths["markdown"]).read_text()
    assert "## The issue-#14 bar" in md and "tiny by source" in md
    assert all(Path(p).exists() for p in paths.values())
    assert json.loads(Path(paths["results"]).read_text())["gates"] == ["copy-2", "learned"]


@pytest.mark.slow
def test_default_gates_skip_the_loso_ones_without_real_data(reference_pair, tmp_path, monkeypatch) -> None:
    from evals.span.run import SpanConfig, SpanEvalError, run_span_eval

    monkeypatch.setenv("ARCHROUTE_REQUESTS", str(tmp_path / "missing"))
    suite = tmp_path / "s.jsonl"
    suite.write_text(json.dumps({"id": "a", "prompt": "x y x y", "reference": "x y x y"}) + "\n")
    base = dict(suites=[str(suite)], bootstrap=0, cache_dir=str(tmp_path / "c"))
    res = run_span_eval(SpanConfig(**base), progress=False, pair=reference_pair)
    assert "learned-loso" not in res["gates"] and "copy-2" in res["gates"]
    with pytest.raises(SpanEvalError, match="real"):  # real requests only: no corpus needed
        run_span_eval(SpanConfig(**base, gates=["learned-loso"], train_corpus=""), progress=False,
                      pair=reference_pair)
    with pytest.raises(SpanEvalError, match="corpus train split is missing"):
        run_span_eval(SpanConfig(**base, gates=["learned-loso"],
                                 train_corpus=str(tmp_path / "no-train.jsonl")),
                      progress=False, pair=reference_pair)


def test_corpus_training_requests_come_from_the_train_split_only(tmp_path: Path) -> None:
    from evals.span.run import SpanEvalError, corpus_provenance, train_corpus_suite

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "(x, y)", "[1, 2]", "{key: value}", "return"]
    docs = [{"id": f"{dom}-{i}", "domain": dom, "source": dom,
             "text": "\n".join(" ".join(rng.choice(words, 9)) + f" line {j} (end {j})"
                               for j in range(80))}
            for dom in ("code", "tex") for i in range(3)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    suite = train_corpus_suite(path, per_domain=5)
    assert suite.name == "corpus-train" and 6 <= len(suite) <= 10
    assert {r.domain for r in suite.requests} == {"corpus-train:code", "corpus-train:tex"}
    assert {"continue", "explain", "repeat"} <= {r.kind for r in suite.requests}
    (tmp_path / "val.jsonl").write_text(path.read_text())
    with pytest.raises(SpanEvalError, match="held-out"):
        train_corpus_suite(tmp_path / "val.jsonl")
    from evals.span.run import SpanConfig, training_seqs

    for bad, msg in ((tmp_path / "val.jsonl", "corpus suite's file"), (tmp_path / "no.jsonl", "missing")):
        with pytest.raises(SpanEvalError, match=msg):  # refused before anything loads
            training_seqs(SpanConfig(corpus=str(tmp_path / "val.jsonl"), train_corpus=str(bad)), None)
    prov = corpus_provenance(path)
    assert prov["split"] == "train" and prov["rows"] == 6 and len(prov["sha256"]) == 64
    assert not prov["eval_only"] and "license" in prov


def test_function_completion_requests_come_from_the_train_splits_code(tmp_path: Path) -> None:
    from evals.span.run import TRAIN_FUNCTIONS, SpanEvalError, train_function_suite

    body = "\n".join(f"    total = total + item * {j}  # step {j}" for j in range(30))
    docs = [{"id": f"code-{i}", "domain": "code", "source": "code",
             "text": "\n\n".join(f"def f{i}_{k}(items):\n    total = 0\n{body}\n    return total"
                                  for k in range(6))} for i in range(3)]
    docs.append({"id": "tex-0", "domain": "tex", "source": "tex", "text": "\\section{A} " * 200})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    suite = train_function_suite(path, 8)
    assert len(suite) == 8 and {r.domain for r in suite.requests} == {TRAIN_FUNCTIONS}
    assert {r.kind for r in suite.requests} == {"complete_function"}
    assert all("def f" in r.prompt and r.reference for r in suite.requests)
    assert len({r.prompt for r in suite.requests}) == 8
    assert [r.prompt for r in train_function_suite(path, 8).requests] == [r.prompt for r in suite.requests]
    (tmp_path / "val.jsonl").write_text(path.read_text())
    with pytest.raises(SpanEvalError, match="held-out"):
        train_function_suite(tmp_path / "val.jsonl", 4)


def test_copy_lock_keeps_a_copy_on_the_transformer_and_asks_the_inner_gate_throughout() -> None:
    # an inner gate that always says hybrid (and counts its calls); the lock overrides it
    # exactly where copy-k would say transformer, and nowhere else
    from models.span.gates import CopyLockGate

    calls = []

    class Hyb(Gate):
        name = "hyb"

        def start(self, prompt_ids, token_text=None) -> GateState:
            class S(GateState):
                def choose(self) -> str:
                    calls.append(1)
                    return "hybrid"

            return S(prompt_ids, token_text)

    s = seq([-1.0] * 5, [-2.0] * 5, prompt=(0, 1, 2, 3), answer=[1, 2, 3, 9, 8])
    locked = rollout(CopyLockGate(Hyb(), 2), s).tolist()
    assert locked == rollout(get_gate("copy-2"), s).tolist() == [False, False, True, True, False]
    assert len(calls) == 5
    assert get_gate("learned+copy-4").name == "learned+copy-4"
    with pytest.raises(ValueError):
        CopyLockGate(Hyb(), 0)


def test_copy_lock_with_prompt_takes_a_short_match_only_into_the_prompt() -> None:
    # "2 3" is a bigram of the prompt: locked at 2 tokens; "60 70" repeats the answer's own
    # text: that needs k = 8; the prompt's own last bigram is no copy signal
    from models.span.gates import CopyLockGate

    def Hyb() -> Gate:  # noqa: N802 - the inner gate: always the hybrid
        return get_gate("always-hybrid")

    answer = [50, 2, 3, 60, 70, 60, 70, 5]
    s = seq([-1.0] * 8, [-2.0] * 8, prompt=(1, 2, 3, 4, 5, 6, 7, 8, 9, 40, 41), answer=answer)
    assert rollout(CopyLockGate(Hyb(), 8, prompt=2), s).tolist() == [
        False, False, False, True, False, False, False, False]
    assert not rollout(CopyLockGate(Hyb(), 8), s).any()
    assert rollout(CopyLockGate(Hyb(), 2), s).tolist()[-1]  # plain copy-2 takes the repeat
    g = get_gate("learned+copy-8-prompt-2")
    assert (g.name, g.k, g.prompt) == ("learned+copy-8-prompt-2", 8, 2)
    for bad in (0, 8, 9):
        with pytest.raises(ValueError):
            CopyLockGate(Hyb(), 8, prompt=bad)


def test_copy_lock_carries_the_inner_gates_artifact() -> None:
    from models.span.remote import entropy_topk, reads_entropy

    locked = get_gate("learned+copy-2")
    assert locked.meta is get_gate("learned").meta or locked.meta == get_gate("learned").meta
    assert reads_entropy(locked) and reads_entropy(get_gate("learned-topk+copy-4"))
    assert entropy_topk(get_gate("learned-topk+copy-4")) == entropy_topk(get_gate("learned-topk"))
    assert not reads_entropy(get_gate("copy-2"))


def test_a_mixing_gate_is_scored_by_the_mixture_where_it_mixes() -> None:
    # an inner gate that always says transformer, unsure on every other token: those tokens
    # are scored by -log(p_T / 2 + p_H / 2), the rest by the transformer; both models read
    # every token up to the last mixed one
    from evals.span.evaluate import gate_stats, rollout_mixed
    from models.span.gates import MixGate

    class Alt(Gate):
        name = "alt"

        def start(self, prompt_ids, token_text=None) -> GateState:
            class S(GateState):
                def choose(self) -> str:
                    self.margin = 0.1 if self.step % 2 else 5.0
                    return "transformer"

            return S(prompt_ids, token_text)

    lt, lh = [-1.0, -3.0, -1.0, -3.0], [-2.0, -0.5, -2.0, -0.5]
    s = seq(lt, lh)
    roles, mixed = rollout_mixed(MixGate(Alt(), 1.0), s)
    assert roles.all() and mixed.tolist() == [False, True, False, True]
    st = gate_stats({"m": MixGate(Alt(), 1.0)}, [s])["m"]
    mix = float(np.logaddexp(-3.0, -0.5) - np.log(2))
    assert st.nll[0] == pytest.approx(1.0 + 1.0 - 2 * mix, abs=1e-5)
    # the hybrid joins for tokens 1 and 3: it catches up on the transformer's 0 and 2
    assert st.n_t[0] == 4 and st.catchup[0] == 2 and st.switches[0] == 0
    plain = gate_stats({"a": Alt()}, [s])["a"]
    assert st.nll[0] < plain.nll[0]  # hedging where the transformer is worse pays here
    from evals.span.evaluate import summarize

    summ = summarize({"m": st, "a": plain}, n_boot=0)
    assert summ["m"]["mixed_per_100"] == 50.0 and summ["a"]["mixed_per_100"] == 0.0
    assert st.take(np.array([0])).mixed.tolist() == [2.0]
    # tilted (+mix-M-tilt-B): the unsure tokens' mixture leans toward the transformer, the
    # side the gate is on, with weight sigmoid(B * 0.1)
    tilted = gate_stats({"t": MixGate(Alt(), 1.0, tilt=2.0)}, [s])["t"]
    w = 1 / (1 + np.exp(-0.2))
    tmix = float(np.log(w * np.exp(-3.0) + (1 - w) * np.exp(-0.5)))
    assert tilted.nll[0] == pytest.approx(1.0 + 1.0 - 2 * tmix, abs=1e-5)
    assert tilted.nll[0] > st.nll[0]  # here the hybrid was the better one on those tokens


def test_every_policy_is_compared_with_always_transformer_and_the_mixture() -> None:
    """Issue #23's bars: each policy's gain over always-transformer and over the 50/50
    mixture, paired (the same resampled requests), in the summary and the report."""
    from evals.span.evaluate import baseline_stats, gate_stats, summarize
    from evals.span.report import mixture_bars
    from models.span.gates import get_gate

    seqs = [seq([-1.0, -3.0, -1.0], [-2.0, -0.5, -2.0], sid=f"r{i}") for i in range(6)]
    stats = {**baseline_stats(seqs), **gate_stats({"copy-1": get_gate("copy-1")}, seqs)}
    summ = summarize(stats, n_boot=50)
    loss = {k: v["loss"][0] for k, v in summ.items()}
    for k, row in summ.items():
        assert row["gain_t"][0] == pytest.approx(loss["always-transformer"] - loss[k], abs=1e-6)
        assert row["gain_mixture"][0] == pytest.approx(loss["mixture-50/50"] - loss[k], abs=1e-6)
    assert summ["mixture-50/50"]["gain_mixture"][0] == 0.0
    lo, hi = summ["always-hybrid"]["gain_t"][1:]
    assert lo <= summ["always-hybrid"]["gain_t"][0] <= hi
    text = "\n".join(mixture_bars({"suites": {"t": {"policies": summ}}}))
    assert "Issue #23's bars" in text and "| t | copy-1 |" in text
    assert "| t | mixture-50/50 |" not in text


def test_a_mixing_gates_settings_are_chosen_on_the_other_sources() -> None:
    from evals.span.tilt import nested_choice

    nll = {"a": {(1.0, 0.0): 10.0, (1.0, 1.5): 9.0},
           "b": {(1.0, 0.0): 5.0, (1.0, 1.5): 6.0},
           "c": {(1.0, 0.0): 5.0, (1.0, 1.5): 4.5},
           "eval-only": {(1.0, 0.0): 1.0, (1.0, 1.5): 9.0}}
    picks = nested_choice(nll, held=["a", "b", "c"])
    # a: b + c = 10.0 vs 10.5 -> B 0; b: a + c = 15 vs 13.5 -> 1.5; c: a + b = 15 vs 15 -> tie,
    # the smaller; the evaluation-only source's own figures are never looked at
    assert picks == {"a": (1.0, 0.0), "b": (1.0, 1.5), "c": (1.0, 0.0),
                     "eval-only": (1.0, 1.5)}
