"""Span profiles in the router: served by the span decoder over the embedded pair, with the
span totals in headers, body, stream and decision log; clear 400s when the pair cannot
span-decode or the gate is unknown; fallback to the transformer when span decoding fails."""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.base import BackendError
from models.span import decoder
from router.app import create_app
from router.settings import SettingsError, load_settings
from tests.router.conftest import Fakes

CODE = [{"role": "user", "content": "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
                                    "print(add(1, 2))\nprint(add("}]


def parse_header(value: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in value.split("; "))


@pytest.fixture()
def pair_app(reference_pair, tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    t, h = reference_pair
    db = tmp_path / "decisions.sqlite"
    settings = load_settings(overrides={"decision_log": str(db)}, environ={})
    with TestClient(create_app(settings, backends={"transformer": t, "hybrid": h})) as client:
        yield client, db


def log_rows(client: TestClient, db: Path) -> list[sqlite3.Row]:
    client.app.state.service.decision_log.flush()
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    return conn.execute("SELECT * FROM decisions ORDER BY id").fetchall()


def test_span_profile_reports_tokens_per_model(pair_app):
    client, db = pair_app
    r = client.post("/v1/chat/completions", json={
        "model": "archroute-span", "messages": CODE, "max_tokens": 24, "temperature": 0,
        "archroute": {"gate": "copy-2"}})
    assert r.status_code == 200, r.text
    body = r.json()
    span = body["archroute"]["span"]
    assert span["gate"] == "copy-2"
    assert span["transformer"] + span["hybrid"] == body["usage"]["completion_tokens"] > 0
    assert span["switches"] >= 1 and span["catchup"] >= 1  # this prompt makes it switch
    head = parse_header(r.headers["x-archroute-span"])
    assert head == {k: str(v) for k, v in span.items()}
    assert r.headers["x-archroute-backend"] == body["archroute"]["backend"] == "span:copy-2"
    assert r.headers["x-archroute-policy"] == "span" and body["archroute"]["decision"] == "span"
    row = log_rows(client, db)[-1]
    assert (row["profile"], row["policy"], row["decision"], row["backend"]) == (
        "archroute-span", "span", "span", "span:copy-2")
    assert json.loads(row["span"]) == span and row["completion_tokens"] == sum(
        span[k] for k in ("transformer", "hybrid"))


def test_span_stream_matches_the_whole_response(pair_app):
    client, db = pair_app
    req = {"model": "archroute-span", "messages": CODE, "max_tokens": 24, "temperature": 0,
           "archroute": {"gate": "copy-1"}}
    whole = client.post("/v1/chat/completions", json=req).json()
    r = client.post("/v1/chat/completions", json={**req, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["x-archroute-span"] == "gate=copy-1"
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[0]["archroute"]["span"] == {"gate": "copy-1"}
    pieces = [e for e in events[1:] if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert pieces and all(e["archroute"]["span_model"] in ("transformer", "hybrid") for e in pieces)
    final = next(e for e in events if e["choices"] and e["choices"][0]["finish_reason"])
    assert final["archroute"]["span"] == whole["archroute"]["span"]
    counts = [e["archroute"]["span_model"] for e in pieces]
    assert {"transformer", "hybrid"} == set(counts)  # both models' text, coloured per chunk
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == whole["usage"]["completion_tokens"]
    row = log_rows(client, db)[-1]
    assert row["stream"] == 1 and json.loads(row["span"]) == final["archroute"]["span"]


def test_gate_per_request_and_its_errors(pair_app, monkeypatch):
    client, _ = pair_app
    r = client.post("/v1/completions", json={"model": "archroute-span", "prompt": "a b a b",
                                             "max_tokens": 6, "archroute": {"gate": "always-hybrid"}})
    span = r.json()["archroute"]["span"]
    assert span == {"gate": "always-hybrid", "transformer": 0, "switches": 0, "catchup": 0,
                    "hybrid": r.json()["usage"]["completion_tokens"], "drafted": 0,
                    "accepted": 0}  # the profile drafts, but only for the transformer
    bad = client.post("/v1/chat/completions", json={"model": "archroute-span", "messages": CODE,
                                                    "archroute": {"gate": "copy-3x"}})
    err = bad.json()["error"]
    assert bad.status_code == 400 and err["param"] == "archroute.gate"
    assert "unknown gate 'copy-3x'" in err["message"] and "copy-3" in err["message"]
    # a request cannot make the router load a file
    r = client.post("/v1/chat/completions", json={"model": "archroute-span", "messages": CODE,
                                                  "archroute": {"gate": "learned:/etc"}})
    assert r.status_code == 400
    r = client.post("/v1/chat/completions", json={"model": "archroute-rules", "messages": CODE,
                                                  "archroute": {"gate": "copy-2"}})
    assert r.status_code == 400 and "span profiles" in r.json()["error"]["message"]
    def no_such_file(name):
        raise FileNotFoundError(f"{name}: nothing trained here")

    monkeypatch.setattr("router.span.get_gate", no_such_file)
    r = client.post("/v1/chat/completions", json={"model": "archroute-span", "messages": CODE,
                                                  "archroute": {"gate": "copy-7+brackets"}})
    assert r.status_code == 400 and "gate 'copy-7+brackets' is not available" in r.text
    monkeypatch.undo()
    route = client.post("/v1/route", json={"model": "archroute-span", "messages": CODE,
                                           "archroute": {"gate": "copy-4"}}).json()
    assert (route["decision"], route["backend"], route["span"]) == (
        "span", "span:copy-4", {"gate": "copy-4"})
    card = client.get("/v1/models/archroute-span").json()
    assert (card["policy"], card["gate"]) == ("span", decoder.default_gate_name())
    r = client.post("/v1/completions", json={"model": "archroute-span", "prompt": "x",
                                             "max_tokens": 2})
    assert r.json()["archroute"]["span"]["gate"] == decoder.default_gate_name()


def test_a_failing_span_decoder_falls_back_to_the_transformer(pair_app, monkeypatch):
    client, db = pair_app

    def broken(self, prompt, params, trace=None):
        raise BackendError("span: broken on purpose")
        yield  # a generator, like the real one

    monkeypatch.setattr(decoder.SpanBackend, "stream", broken)
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={
            "model": "archroute-span", "messages": CODE, "max_tokens": 4, "stream": stream,
            "archroute": {"gate": "copy-5"}})
        assert r.status_code == 200
        assert r.headers["x-archroute-backend"] == "reference-transformer"
        assert r.headers["x-archroute-fallback"].startswith("span:copy-5; reason=")
        assert "x-archroute-span" not in r.headers
        row = log_rows(client, db)[-1]
        assert (row["backend"], row["fallback_from"], row["span"]) == (
            "reference-transformer", "span:copy-5", None)
    body = client.post("/v1/chat/completions", json={
        "model": "archroute-span", "messages": CODE, "max_tokens": 4,
        "archroute": {"gate": "copy-5"}}).json()
    assert "span" not in body["archroute"]


def test_span_profile_on_fake_backends_is_a_400(tmp_path):
    f = Fakes(tmp_path)
    with TestClient(f.app) as client:
        r = client.post("/v1/chat/completions", json={"model": "archroute-span",
                                                      "messages": CODE})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert "span routing needs two in-process backends sharing a tokenizer" in msg
        assert "'t-fake' is not in-process (FakeBackend)" in msg
        ok = client.post("/v1/chat/completions", json={"model": "archroute-rules",
                                                       "messages": CODE})
        assert ok.status_code == 200  # the other profiles are unaffected


def test_upstream_pair_is_a_400(tmp_path):
    from models.upstream import OpenAIUpstreamBackend

    f = Fakes(tmp_path)
    up = {role: OpenAIUpstreamBackend(f"{role}-up", "http://127.0.0.1:9/v1", "m")
          for role in ("transformer", "hybrid")}
    app = create_app(f.settings, backends=up)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "archroute-span", "prompt": "x"})
        assert r.status_code == 400 and "backends.transformer.tokenizer" in r.json()["error"]["message"]


def test_an_in_process_model_beside_an_upstream_is_a_400(reference_pair, tmp_path):
    from models.upstream import OpenAIUpstreamBackend

    f = Fakes(tmp_path)
    pair = {"transformer": reference_pair[0],
            "hybrid": OpenAIUpstreamBackend("h-up", "http://127.0.0.1:9/v1", "m")}
    with TestClient(create_app(f.settings, backends=pair)) as client:
        r = client.post("/v1/completions", json={"model": "archroute-span", "prompt": "x"})
        assert r.status_code == 400 and "OpenAIUpstreamBackend" in r.json()["error"]["message"]


def test_tokenizers_that_differ_are_a_400(reference_pair, tmp_path):
    t, h = reference_pair
    other = copy.copy(h)
    other.prefix_id = 7
    settings = load_settings(overrides={"decision_log": ""}, environ={})
    with TestClient(create_app(settings, backends={"transformer": t, "hybrid": other})) as client:
        r = client.post("/v1/completions", json={"model": "archroute-span", "prompt": "x"})
        assert r.status_code == 400 and "start tokens (prefix_id) differ" in r.text


def test_span_settings_are_checked_at_start():
    with pytest.raises(SettingsError, match=r"unknown gate 'copy-22' \(did you mean"):
        load_settings(overrides={"profiles": {"s": {"policy": "span", "policy_args": {
            "gate": "copy-22"}}}, "default_profile": "s"}, environ={})
    with pytest.raises(SettingsError, match="threshold"):
        load_settings(overrides={"profiles": {"s": {"policy": "span", "threshold": 0.5}},
                                 "default_profile": "s"}, environ={})
    with pytest.raises(SettingsError, match=r"unknown policy_args \['k'\]; known: .*draft_k"):
        load_settings(overrides={"profiles": {"s": {"policy": "span", "policy_args": {
            "k": 2}}}, "default_profile": "s"}, environ={})
    for bad, what in (({"draft_k": 33}, "draft_k"), ({"draft_k": -1}, "draft_k"),
                      ({"draft_k": "8"}, "draft_k"), ({"draft_min_match": 0}, "draft_min_match"),
                      ({"draft_min_match": 9}, "draft_min_match")):
        with pytest.raises(SettingsError, match=rf"policy_args\.{what}: must be an integer"):
            load_settings(overrides={"profiles": {"s": {"policy": "span", "policy_args": bad}},
                                     "default_profile": "s"}, environ={})
    s = load_settings(overrides={"profiles": {"s": {"policy": "span"}}, "default_profile": "s"},
                      environ={})
    assert s.profiles["s"].span_gate == "copy-2"
    assert s.profiles["s"].span_draft == (8, 2)  # drafting on by default (measured)


def test_default_gate_is_learned_only_when_it_ships_and_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(decoder, "DEFAULT_GATE_DIR", tmp_path / "missing")
    decoder.default_gate_name.cache_clear()
    try:
        assert decoder.default_gate_name() == "copy-2"
        monkeypatch.setattr(decoder, "DEFAULT_GATE_DIR", tmp_path)
        decoder.default_gate_name.cache_clear()

        def no_gate(name):
            raise FileNotFoundError("no gate.json")

        monkeypatch.setattr(decoder, "get_gate", no_gate)
        assert decoder.default_gate_name() == "copy-2"
        decoder.default_gate_name.cache_clear()
        monkeypatch.setattr(decoder, "get_gate", lambda name: object())
        assert decoder.default_gate_name() == "learned"
    finally:
        decoder.default_gate_name.cache_clear()


# ---- `archroute` is span routing wherever the pair can ----------------------------------

def test_archroute_is_span_decoding_on_the_embedded_pair(pair_app):
    """No default_profile set: on two in-process models with one tokenizer `archroute` is
    the span profile (drafted copy spans on), and /v1/models and each decision say so."""
    client, db = pair_app
    card = client.get("/v1/models").json()["data"][0]
    assert (card["id"], card["alias_of"], card["routing"], card["policy"]) == (
        "archroute", "archroute-span", "span", "span")
    assert card["gate"] == decoder.default_gate_name() and card["draft_k"] == 8
    r = client.post("/v1/completions", json={"model": "archroute", "prompt": CODE[0]["content"],
                                             "max_tokens": 24, "temperature": 0,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    ext = r.json()["archroute"]
    assert r.headers["x-archroute-profile"] == ext["profile"] == "archroute-span"
    assert r.headers["x-archroute-policy"] == ext["policy"] == "span"
    span = ext["span"]
    assert span["transformer"] + span["hybrid"] == r.json()["usage"]["completion_tokens"] == 24
    assert span["accepted"] <= span["drafted"]
    assert parse_header(r.headers["x-archroute-span"])["drafted"] == str(span["drafted"])
    assert log_rows(client, db)[-1]["profile"] == "archroute-span"
    # the request profiles stay
    auto = client.post("/v1/chat/completions", json={"model": "archroute-auto",
                                                     "messages": CODE, "max_tokens": 4})
    assert auto.json()["archroute"]["policy"] in ("classifier", "classifier+rules-fallback")
    assert "span" not in auto.json()["archroute"]


def test_drafting_through_the_router_leaves_the_greedy_answer(reference_pair, tmp_path):
    """The same gate with and without drafted copy spans (two span profiles): the same
    greedy answer, chunk by chunk in a stream too; only the drafted one reports drafts."""
    t, h = reference_pair
    gate = decoder.default_gate_name()
    profiles = {"on": {"policy": "span", "policy_args": {"gate": gate, "draft_k": 6}},
                "off": {"policy": "span", "policy_args": {"gate": gate, "draft_k": 0}}}
    settings = load_settings(overrides={"profiles": profiles, "decision_log": ""}, environ={})
    with TestClient(create_app(settings, backends={"transformer": t, "hybrid": h})) as client:
        out = {}
        for name in profiles:
            req = {"model": name, "prompt": CODE[0]["content"], "max_tokens": 40,
                   "temperature": 0, "ignore_eos": True}
            whole = client.post("/v1/completions", json=req)
            assert whole.status_code == 200, whole.text
            assert whole.json()["usage"]["completion_tokens"] == 40  # ignore_eos honoured
            streamed = client.post("/v1/completions", json={**req, "stream": True})
            text = "".join(json.loads(line[6:])["choices"][0]["text"]
                           for line in streamed.text.splitlines()
                           if line.startswith("data: {") and json.loads(line[6:])["choices"])
            out[name] = (whole.json()["choices"][0]["text"], text,
                         whole.json()["archroute"]["span"])
        assert out["on"][0] == out["off"][0] == out["on"][1] == out["off"][1]
        on, off = out["on"][2], out["off"][2]
        assert {k: on[k] for k in off} == off and on["accepted"] > 0 and "drafted" not in off


def test_archroute_routes_per_request_where_the_pair_cannot_span(tmp_path):
    """Fakes (not in-process models) cannot span-decode: `archroute` is the request
    classifier's profile, and says so; a configured default_profile is taken as given."""
    f = Fakes(tmp_path)
    with TestClient(f.app) as client:
        card = client.get("/v1/models/archroute").json()
        assert (card["alias_of"], card["routing"]) == ("archroute-auto", "request")
        r = client.post("/v1/chat/completions", json={"model": "archroute", "messages": CODE})
        assert r.status_code == 200 and r.headers["x-archroute-profile"] == "archroute-auto"
    f = Fakes(tmp_path, default_profile="archroute-rules")
    with TestClient(f.app) as client:
        card = client.get("/v1/models/archroute").json()
        assert (card["alias_of"], card["routing"]) == ("archroute-rules", "request")


def test_span_slots_are_built_at_start_and_shown_in_ready_and_metrics(pair_app):
    """Every span profile's slot is built with the app, like every backend: /ready and
    /metrics show it from the start (readiness stays the models')."""
    client, _ = pair_app
    svc = client.app.state.service
    spans = {p.span_gate for p in svc.settings.profiles.values() if p.span_gate}
    assert spans and {gate for gate, _ in svc.span.slots} >= spans
    assert svc.span_unavailable == {}
    ready = client.get("/ready").json()
    shown = {v["gate"]: name for name, v in ready["backends"].items() if v["role"] == "span"}
    assert set(shown) >= spans and ready["ready"] is True
    metrics = client.get("/metrics").text
    assert all(f'archroute_backend_in_flight{{backend="{name}"}}' in metrics
               for name in shown.values())


def test_why_a_span_profile_cannot_serve_is_known_at_start(tmp_path):
    f = Fakes(tmp_path)
    with TestClient(f.app) as client:
        why = client.app.state.service.span_unavailable
        assert "archroute-span" in why and "'t-fake' is not in-process" in why["archroute-span"]
        assert all(v["role"] != "span" for v in client.get("/ready").json()["backends"].values())
