"""Conversations stay on their backend (router/conversations.py, #24 item 5): follow-up turns,
the stay-or-switch rule, where it shows (record, body, header, metrics), the decision log as
the memory replicas share, and the settings' start-up errors. Fake backends, in-process;
the embedded pair through a real server: test_conversations_e2e.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from classifiers.artifact import RequestClassifier
from classifiers.request import RoutingRequest
from models.base import ChatMessage
from router.conversations import (
    ConversationMemory,
    Earlier,
    answer_key,
    follow_up_key,
    stick,
    turn_key,
)
from router.decision_log import read_log
from router.policies import ClassifierPolicy, RulesPolicy, decide
from router.settings import SettingsError, load_settings
from tests.router.conftest import Fakes, fake_settings

PROSE = "Write a short poem about the sea at dusk."  # rules: 0.3, the hybrid
COPY = "Repeat this exactly: the sea, the sea."  # rules: a copy cue, 0.65, the transformer
PROFILES = {"stay": {"policy": "rules", "conversation": {"handoff_cost": 1000}},
            "follow": {"policy": "rules", "conversation": {"handoff_cost": 0}},
            "plain": {"policy": "rules", "conversation": {"sticky": False}},
            "default": {"policy": "rules"}}


def req(*turns: tuple[str, str]) -> RoutingRequest:
    return RoutingRequest(tuple(ChatMessage(r, c) for r, c in turns))  # type: ignore[arg-type]


# --- follow-up turns ---------------------------------------------------------------


def test_a_follow_up_is_found_by_the_answer_it_resends() -> None:
    first = req(("system", "Be brief."), ("user", PROSE))
    assert follow_up_key(first) is None  # a first turn
    key = answer_key(first, "The sea at dusk.")
    nxt = req(("system", "Be brief."), ("user", PROSE), ("assistant", " The sea at dusk.\n"),
              ("user", COPY))
    assert follow_up_key(nxt) == key  # whitespace around a turn's text does not matter
    other = req(("system", "Be brief."), ("user", PROSE), ("assistant", "Another answer."),
                ("user", COPY))
    assert follow_up_key(other) != key  # an answer the router did not give
    assert follow_up_key(req(("user", PROSE), ("user", COPY))) is None  # no assistant turn
    assert follow_up_key(RoutingRequest.from_prompt(PROSE)) is None  # a completion
    assert turn_key(first.messages) != turn_key(req(("user", PROSE)).messages)
    tool = (ChatMessage("tool", "42", tool_call_id="call_1"),)
    assert turn_key(tool) != turn_key((ChatMessage("tool", "42", tool_call_id="call_2"),))
    # no two conversations share an encoding: turn boundaries are part of the key
    assert turn_key(req(("user", "ab"), ("user", "c")).messages) != turn_key(
        req(("user", "a"), ("user", "bc")).messages)


def test_the_rule_stays_unless_the_gain_beats_the_cost() -> None:
    e = Earlier("hybrid", 2000)
    assert stick(e, "hybrid", 0.9, 0.01).outcome == "same"
    kept = stick(e, "transformer", 0.019, 0.01)  # cost 0.01 * 2000 / 1000 = 0.02
    assert (kept.outcome, kept.role, kept.handoff_cost) == ("kept", "hybrid", 0.02)
    switched = stick(e, "transformer", 0.021, 0.01)
    assert (switched.outcome, switched.role) == ("switched", "transformer")
    assert stick(e, "transformer", 0.0, 0.0).outcome == "switched"  # cost 0: the policy
    assert "kept; earlier=hybrid; gain=0.0190; handoff_cost=0.0200; tokens=2000" == kept.header()


def test_the_memory_is_bounded() -> None:
    m = ConversationMemory(2)
    for k in "abc":
        m.put(k, Earlier("hybrid", 1))
    assert len(m) == 2 and m.get("a") is None and m.get("c") is not None


def test_gain_is_the_gap_past_the_decision_boundary() -> None:
    """The shipped classifier's score is a calibrated gap (logit P = a * gap + b): its gain
    is exactly the predicted gap's distance (nats/token) from the threshold's gap."""
    p = ClassifierPolicy()
    if p.model_ is None:
        pytest.skip("the shipped classifier artifact is not available")
    assert isinstance(p.model_, RequestClassifier)
    m = p.model_
    a, b = m.calibration
    thr = p.default_threshold()
    gap_thr = (math.log(thr / (1 - thr)) - b) / a
    for text in (PROSE, COPY, "def add(a, b):\n    return a - b\nFix the bug."):
        r = RoutingRequest.from_prompt(text)
        X, _ = m.named_features(r)
        gap = float(m.gap_from_features(X)[0])
        score = p.score(r)
        assert p.gain(score, thr) == pytest.approx(abs(gap - gap_thr), rel=1e-6)
    rules = RulesPolicy()  # no gap model: the default slope per logit
    assert rules.gain(0.5, 0.5) == 0.0 and rules.gain(0.65, 0.5) > rules.gain(0.55, 0.5) > 0


# --- through the router ------------------------------------------------------------


def chat(client: TestClient, model: str, messages: list[dict], stream: bool = False):
    body = {"model": model, "messages": messages, "stream": stream}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                       for line in r.text.splitlines()
                       if line.startswith("data: {") and '"choices": [{' in line)
        return r, text
    return r, r.json()["choices"][0]["message"]["content"]


def two_turns(client: TestClient, model: str, stream_first: bool = False):
    msgs = [{"role": "user", "content": PROSE}]
    r1, a1 = chat(client, model, msgs, stream=stream_first)
    msgs += [{"role": "assistant", "content": a1}, {"role": "user", "content": COPY}]
    r2, _ = chat(client, model, msgs)
    return r1, r2


@pytest.fixture()
def fakes(tmp_path: Path):
    f = Fakes(tmp_path, profiles=PROFILES)
    with TestClient(f.app) as client:
        yield f, client


def test_a_follow_up_stays_on_the_earlier_backend(fakes) -> None:
    _, client = fakes
    r1, r2 = two_turns(client, "stay")
    assert r1.headers["x-archroute-backend"] == "h-fake"
    assert "x-archroute-conversation" not in r1.headers  # a first turn
    body = r2.json()["archroute"]
    assert decide(body["score"], body["threshold"]) == "transformer"  # the policy's pick
    assert r2.headers["x-archroute-backend"] == "h-fake"  # kept
    conv = body["conversation"]
    assert conv["outcome"] == "kept" and conv["earlier"] == "hybrid"
    assert conv["picked"] == "transformer" and conv["gain"] < conv["handoff_cost"]
    assert conv["handoff_cost"] == pytest.approx(1000 * conv["tokens"] / 1000)
    assert r2.headers["x-archroute-conversation"].startswith("kept; earlier=hybrid; gain=")
    metrics = client.get("/metrics").text
    assert 'archroute_conversation_turns_total{outcome="kept",profile="stay"} 1.0' in metrics


def test_a_long_conversation_is_hashed_off_the_loop_and_still_found(fakes) -> None:
    _, client = fakes
    long = PROSE + " " + "waves " * 10_000  # 60,000 characters: hashed in a worker thread
    msgs = [{"role": "user", "content": long}]
    r1, a1 = chat(client, "stay", msgs)
    msgs += [{"role": "assistant", "content": a1}, {"role": "user", "content": COPY}]
    r2, _ = chat(client, "stay", msgs)
    assert r2.json()["archroute"]["conversation"]["earlier"] == r1.json()["archroute"]["decision"]


def test_handoff_cost_zero_follows_the_policy(fakes) -> None:
    _, client = fakes
    r1, r2 = two_turns(client, "follow")
    assert r1.headers["x-archroute-backend"] == "h-fake"
    assert r2.headers["x-archroute-backend"] == "t-fake"
    assert r2.json()["archroute"]["conversation"]["outcome"] == "switched"
    assert ('archroute_conversation_turns_total{outcome="switched",profile="follow"} 1.0'
            in client.get("/metrics").text)


def test_not_sticky_and_made_up_answers_are_first_turns(fakes) -> None:
    _, client = fakes
    _, r2 = two_turns(client, "plain")
    assert r2.headers["x-archroute-backend"] == "t-fake"
    assert "conversation" not in r2.json()["archroute"]
    msgs = [{"role": "user", "content": PROSE}, {"role": "assistant", "content": "not ours"},
            {"role": "user", "content": COPY}]
    r, _ = chat(client, "stay", msgs)
    assert r.headers["x-archroute-backend"] == "t-fake"
    assert "x-archroute-conversation" not in r.headers


def test_a_streamed_answer_is_remembered_and_route_agrees(fakes) -> None:
    _, client = fakes
    msgs = [{"role": "user", "content": PROSE}]
    r1, a1 = chat(client, "default", msgs, stream=True)
    assert a1 == "from hybrid" and r1.headers["x-archroute-backend"] == "h-fake"
    msgs += [{"role": "assistant", "content": a1}, {"role": "user", "content": COPY}]
    # the measured default cost: the rules' gain (~0.32 nats/token) beats it on a short chat
    decided = client.post("/v1/route", json={"model": "default", "messages": msgs}).json()
    assert decided["conversation"]["outcome"] == "switched"
    r2, _ = chat(client, "default", msgs)
    assert r2.json()["archroute"]["conversation"] == decided["conversation"]


def test_replicas_find_the_turn_in_the_shared_log(tmp_path: Path) -> None:
    """Router B never saw turn 1: it finds it in the decision log router A wrote."""
    a, b = Fakes(tmp_path, profiles=PROFILES), Fakes(tmp_path, profiles=PROFILES)
    with TestClient(a.app) as ca, TestClient(b.app) as cb:
        msgs = [{"role": "user", "content": PROSE}]
        r1, a1 = chat(ca, "stay", msgs)
        assert a.app.state.service.decision_log.find(r1.json()["id"]) is not None  # committed
        msgs += [{"role": "assistant", "content": a1}, {"role": "user", "content": COPY}]
        r2, _ = chat(cb, "stay", msgs)
        assert r2.headers["x-archroute-backend"] == "h-fake"
        assert r2.json()["archroute"]["conversation"]["outcome"] == "kept"
        assert b.app.state.service.conversations.found_in_log == 1
        b.app.state.service.decision_log.find(r2.json()["id"])
    rows = read_log(tmp_path / "decisions.sqlite")
    first, second = rows[0], rows[-1]
    assert first["conversation"] is None and first["turn_key"]
    assert second["conversation"]["outcome"] == "kept" and second["turn_key"] != first["turn_key"]


# --- settings ------------------------------------------------------------------------


@pytest.mark.parametrize("conversation, why", [
    ({"handoff_cost": -0.1}, "greater than or equal to 0"),
    ({"handoff_cost": "cheap"}, "valid number"),
    ({"handoff_cost": float("inf")}, "finite number"),
    ({"sticky": "sometimes"}, "valid boolean"),
    ({"handoff": 0.1}, "Extra inputs are not permitted"),
])
def test_bad_conversation_settings_stop_the_router(tmp_path: Path, conversation, why) -> None:
    with pytest.raises(SettingsError) as e:
        fake_settings(tmp_path, profiles={"p": {"policy": "rules",
                                                "conversation": conversation}})
    assert "profiles.p.conversation" in str(e.value) and why in str(e.value)


def test_conversation_does_not_apply_to_span_profiles(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="span profile: 'conversation' does not apply"):
        fake_settings(tmp_path, profiles={"s": {"policy": "span",
                                                "conversation": {"sticky": True}}})
    with pytest.raises(SettingsError, match="conversation_cache"):
        fake_settings(tmp_path, conversation_cache=0)
    s = load_settings(environ={})  # the built-ins: request profiles sticky, span untouched
    assert s.profiles["archroute-auto"].conversation.sticky
    assert "conversation" not in s.profiles["archroute-span"].model_fields_set
