"""Policies only score; one shared rule decides."""

from __future__ import annotations

import pytest

from classifiers.request import RoutingRequest
from router.policies import (
    Policy,
    UnknownPolicyError,
    decide,
    get_policy,
    list_policies,
    register,
)


@pytest.fixture(autouse=True)
def _fresh_classifier_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    import router.policies

    monkeypatch.setattr(router.policies, "_DEFAULT_MODEL", [])


SEMANTIC = RoutingRequest.from_prompt("Write a short poem about the sea and how it feels at dusk.")
COPY = RoutingRequest.from_prompt("Repeat this sentence exactly: the cat sat on the mat.")
CODE = RoutingRequest.from_messages([{"role": "user", "content": "def f(x):\n    return [x, (1"}])


def test_decide_is_the_one_rule() -> None:
    assert decide(0.5, 0.5) == "transformer"
    assert decide(0.49, 0.5) == "hybrid"
    assert decide(0.0, 0.0) == "transformer"
    assert decide(1.0, 1.01) == "hybrid"


def test_builtins_listed() -> None:
    names = list_policies()
    for n in ["always-transformer", "always-hybrid", "random", "rules", "classifier"]:
        assert n in names


@pytest.mark.parametrize("name", ["always-transformer", "always-hybrid", "random", "rules",
                                  "classifier"])
def test_scores_in_unit_interval(name: str) -> None:
    p = get_policy(name)
    scores = p.score_batch([SEMANTIC, COPY, CODE])
    assert len(scores) == 3
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert p.score(COPY) == scores[1]


def test_did_you_mean() -> None:
    with pytest.raises(UnknownPolicyError, match="did you mean 'rules'"):
        get_policy("rule")
    with pytest.raises(KeyError):
        get_policy("nope")


def test_bad_kwargs_are_value_errors() -> None:
    with pytest.raises(ValueError, match="random"):
        get_policy("random", p=2.0)
    with pytest.raises(ValueError, match="bad arguments"):
        get_policy("rules", nonsense=1)


def test_rules_follow_the_study() -> None:
    rules = get_policy("rules")
    assert decide(rules.score(COPY)) == "transformer"
    assert decide(rules.score(CODE)) == "transformer"
    assert decide(rules.score(SEMANTIC)) == "hybrid"


def test_random_share_and_determinism() -> None:
    reqs = [RoutingRequest.from_prompt(f"request {i}") for i in range(2000)]
    p = get_policy("random", p=0.3, seed=1)
    share = sum(decide(s) == "transformer" for s in p.score_batch(reqs)) / len(reqs)
    assert 0.25 < share < 0.35
    assert p.score_batch(reqs[:10]) == get_policy("random", p=0.3, seed=1).score_batch(reqs[:10])


def test_classifier_uses_artifact_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    class Model:
        def predict_proba(self, reqs: list[RoutingRequest]) -> list[float]:
            return [0.9 for _ in reqs]

    fake = types.ModuleType("classifiers.artifact")
    fake.load_default = Model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "classifiers.artifact", fake)
    p = get_policy("classifier")
    assert not p.fallback_  # type: ignore[attr-defined]
    assert p.score(SEMANTIC) == pytest.approx(0.9)
    # a cost weight lowers long prompts' scores only
    long_req = RoutingRequest.from_prompt("x " * 8000)
    pc = get_policy("classifier", cost_weight=0.5)
    assert pc.score(long_req) < pc.score(SEMANTIC) <= 0.9


def test_classifier_falls_back_to_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "classifiers.artifact", None)  # import fails
    p = get_policy("classifier")
    assert p.fallback_  # type: ignore[attr-defined]
    assert p.score(COPY) == get_policy("rules").score(COPY)


def test_register_like_a_plugin() -> None:
    @register("test-const")
    class ConstPolicy(Policy):
        def score(self, req: RoutingRequest) -> float:
            return 0.7

    assert "test-const" in list_policies()
    assert get_policy("test-const").score(SEMANTIC) == 0.7
    with pytest.raises(ValueError):
        register("Bad Name")


@pytest.mark.parametrize("name", ["rules", "classifier", "always-hybrid"])
def test_explain_gives_the_score_and_its_features_in_one_pass(name):
    policy = get_policy(name)
    req = RoutingRequest.from_prompt("Quote verbatim:\n\ndef f(x):\n    return [x, (x + 1)\n")
    score, feats = policy.explain(req)
    assert score == pytest.approx(policy.score(req))
    assert bool(feats) == (name != "always-hybrid")
    assert all(isinstance(v, float) for v in feats.values())


def test_classifier_risk_operating_points() -> None:
    """The shipped artifact carries thresholds with a guarantee; asking for one it does not
    have is an error naming the ones it has."""
    from router.policies import get_policy

    p = get_policy("classifier", operating_point="risk-0.1")
    if p.fallback_:
        pytest.skip("the shipped classifier artifact did not load")
    q = get_policy("classifier", operating_point="quality")
    assert p.default_threshold() > q.default_threshold()  # more requests to the hybrid
    with pytest.raises(ValueError, match="risk-0.05"):
        get_policy("classifier", operating_point="risk-0.3")
    with pytest.raises(ValueError, match="operating_point"):
        get_policy("classifier", operating_point="cheap")


@pytest.mark.parametrize("text", [
    "Repeat exactly: the cat sat on the mat.", "Copy the paragraph word-for-word.",
    "Quote the second sentence.", "Please transcribe it unchanged.", "It echoes the same words.",
    "Write a poem about the sea.", "The copyright notice is at the end.",
    "Explain the exactness of floats.", "Reproduce the table as written.",
])
def test_rules_and_features_read_the_same_copy_cues(text: str) -> None:
    """One list (classifiers/lexicon.py COPY_CUES) behind the rules policy's copy rule and
    the classifier's copy_cue feature: they fire on the same texts (they used to disagree)."""
    from classifiers.features import FEATURE_NAMES, extract
    from router.policies import RulesPolicy

    req = RoutingRequest.from_messages([{"role": "user", "content": text}])
    rules = RulesPolicy().features(req)["copy_cue"] > 0
    feature = extract(req)[FEATURE_NAMES.index("copy_cue")] > 0
    assert rules == feature, text
