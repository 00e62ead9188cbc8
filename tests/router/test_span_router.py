"""Span profiles in the router: served by the span decoder over the embedded pair, with the
span totals in headers, body, stream and decision log; a 400 for an unknown gate; a pair
that cannot span-decode stops the router at start (a configured span profile) or leaves the
built-in one out (a 404 that says why); fallback to the transformer when span decoding
fails."""

from __future__ import annotations

import copy
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.base import BackendError
from models.span import decoder
from router.app import create_app
from router.settings import SettingsError, load_settings
from tests.router.conftest import Fakes

# a chat request the chat-tuned pair answers by copying (copy-2 switches on it)
CODE = [{"role": "user", "content": "Repeat exactly: def add(a, b):\n    return a + b\n\n"
                                    "print(add(1, 2))\nprint(add(1, 2))"}]


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
           "archroute": {"gate": "copy-2"}}
    whole = client.post("/v1/chat/completions", json=req).json()
    r = client.post("/v1/chat/completions", json={**req, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["x-archroute-span"] == "gate=copy-2"
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[0]["archroute"]["span"] == {"gate": "copy-2"}
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
    # a gate with wrappers, mixing where unsure: the totals count the mixed tokens
    r = client.post("/v1/completions", json={"model": "archroute-span", "prompt": "a b a b",
                                             "max_tokens": 6,
                                             "archroute": {"gate": "copy-2+mix-1"}})
    assert r.status_code == 200 and r.json()["archroute"]["span"]["gate"] == "copy-2+mix-1"
    for bad_gate in ("copy-2+mix-0", "copy-2+mix-x", "copy-2+foo"):
        r = client.post("/v1/completions", json={"model": "archroute-span", "prompt": "a",
                                                 "archroute": {"gate": bad_gate}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "archroute.gate", bad_gate
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


# ---- a pair that cannot span: a configured span profile stops the router at start, ------
# ---- the built-in one is not served -------------------------------------------------------

SPAN_PROFILE = {"s": {"policy": "span", "policy_args": {"gate": "copy-2"}}}


def _upstreams():
    from models.upstream import OpenAIUpstreamBackend

    return {role: OpenAIUpstreamBackend(f"{role}-up", "http://127.0.0.1:9/v1", "m")
            for role in ("transformer", "hybrid")}


def _beside_upstream(pair):
    from models.upstream import OpenAIUpstreamBackend

    return {"transformer": pair[0],
            "hybrid": OpenAIUpstreamBackend("h-up", "http://127.0.0.1:9/v1", "m")}


def _other_tokenizer(pair):
    other = copy.copy(pair[1])
    other.prefix_id = 7
    return {"transformer": pair[0], "hybrid": other}


# (the pair, the setting the start-up error names, what it says)
CANNOT_SPAN = {
    "fakes": (None, "(backends.transformer, backends.hybrid)",
              "the transformer backend 't-fake' is not in-process (FakeBackend)"),
    "engines without a tokenizer": (_upstreams, "(backends.transformer.tokenizer)",
                                    "set backends.transformer.tokenizer"),
    "in-process beside an upstream": (_beside_upstream, "(backends.transformer, backends.hybrid)",
                                      "'h-up' is not in-process (OpenAIUpstreamBackend)"),
    "tokenizers that differ": (_other_tokenizer, "(backends.transformer, backends.hybrid)",
                               "start tokens (prefix_id) differ"),
}


def _pair(name, request):
    make = CANNOT_SPAN[name][0]
    if make is None:
        return None
    if make is _upstreams:
        return make()
    return make(request.getfixturevalue("reference_pair"))


@pytest.mark.parametrize("name", list(CANNOT_SPAN))
def test_a_configured_span_profile_the_pair_cannot_serve_stops_the_router(name, request,
                                                                          tmp_path):
    """One line naming the profile, the setting and why; the app never starts."""
    _, setting, why = CANNOT_SPAN[name]
    f = Fakes(tmp_path, profiles=SPAN_PROFILE)
    pair = _pair(name, request)
    app = f.app if pair is None else create_app(f.settings, backends=pair)
    with pytest.raises(SettingsError) as exc, TestClient(app):
        pass
    msg = str(exc.value)
    assert msg.startswith(f"invalid settings: profiles.s: cannot span-decode on this pair {setting}: ")
    assert why in msg and "\n" not in msg


@pytest.mark.parametrize("name", list(CANNOT_SPAN))
def test_the_built_in_span_profile_is_not_served_where_the_pair_cannot_span(name, request,
                                                                            tmp_path):
    """The defaults' archroute-span: absent from /v1/models, a 404 that says why; the
    other profiles serve, and `archroute` routes per request (saying why not span)."""
    why = CANNOT_SPAN[name][2]
    f = Fakes(tmp_path)  # the built-in profiles
    pair = _pair(name, request)
    app = f.app if pair is None else create_app(f.settings, backends=pair)
    with TestClient(app) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert "archroute-span" not in ids and "archroute-auto" in ids
        card = client.get("/v1/models/archroute").json()
        assert (card["alias_of"], card["routing"]) == ("archroute-auto", "request")
        assert why in card["description"]
        for r in (client.post("/v1/chat/completions", json={"model": "archroute-span",
                                                            "messages": CODE}),
                  client.post("/v1/route", json={"model": "archroute-span", "messages": CODE}),
                  client.get("/v1/models/archroute-span")):
            err = r.json()["error"]
            assert r.status_code == 404 and err["code"] == "model_not_found", r.text
            assert "this pair cannot span-decode" in err["message"] and why in err["message"]
        if pair is None:  # fakes answer: the other profiles are unaffected
            ok = client.post("/v1/chat/completions", json={"model": "archroute-rules",
                                                           "messages": CODE})
            assert ok.status_code == 200


def serve_exit(config: dict, tmp: Path) -> tuple[int, str]:
    """A real ``archroute serve`` process on ``config`` that must stop before it serves: its
    exit status and its one log line about the settings (asserting there is exactly one, and
    no traceback)."""
    import subprocess
    import sys

    import yaml

    from tests.router.servers import ROOT, free_port

    (tmp / "router.yaml").write_text(yaml.safe_dump(config))
    r = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--config",
                        str(tmp / "router.yaml"), "--port", str(free_port())],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                            "HF_HUB_OFFLINE": "1"})
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    (line,) = [x for x in out.splitlines() if "invalid settings" in x]
    return r.returncode, line


@pytest.mark.slow
def test_archroute_serve_exits_with_one_line_on_a_span_profile_it_cannot_serve(tmp_path):
    """A real `archroute serve` process: a span profile configured on two fakes stops it
    before it serves, non-zero, the reason one line (no traceback)."""
    cfg = {"backends": {"transformer": {"name": "t-fake", "kind": "fake"},
                        "hybrid": {"name": "h-fake", "kind": "fake"}},
           "profiles": SPAN_PROFILE, "decision_log": ""}
    rc, line = serve_exit(cfg, tmp_path)
    assert rc != 0
    assert ("profiles.s: cannot span-decode on this pair (backends.transformer, "
            "backends.hybrid): ") in line and "'t-fake' is not in-process" in line


# ---- span over engines: one breaker per engine ---------------------------------------------

def test_a_failing_engine_opens_its_own_breaker_once(tmp_path):
    """Span decoding over two engines, the hybrid's port refusing connections (a real
    socket): the span's request to it is admitted by the hybrid's own slot, whose breaker
    opens (failure_threshold 1) and shows in /ready and /metrics under its name; the span
    slot has no breaker of its own, it reads the engines' (open while one is); the
    transformer's stays closed. A request naming the hybrid then meets its cool-down."""
    from models.reference_pair import REFERENCE_DIR
    from tests.router.servers import free_port

    backends = {role: {"name": f"{role}-engine", "kind": "upstream", "model": "m",
                       "base_url": f"http://127.0.0.1:{free_port()}/v1", "timeout_s": 5}
                for role in ("transformer", "hybrid")}
    backends["transformer"]["tokenizer"] = str(REFERENCE_DIR / "transformer")
    settings = load_settings(overrides={
        "backends": backends, "decision_log": "", "fallback": False, "failure_threshold": 1,
        "cooldown_s": 60, "profiles": {"span-h": {"policy": "span", "policy_args": {
            "gate": "always-hybrid"}}}}, environ={})
    with TestClient(create_app(settings)) as client:
        svc = client.app.state.service
        span = svc.span.slot("always-hybrid")
        assert span.name == "span-remote:always-hybrid" and span.state == "closed"
        r = client.post("/v1/completions", json={"model": "span-h", "prompt": "x",
                                                 "max_tokens": 4})
        assert r.status_code == 502, r.text
        engines = svc.slots
        assert (engines["hybrid"].failures, engines["hybrid"].state) == (1, "open")
        assert (engines["transformer"].failures, engines["transformer"].state) == (0, "closed")
        ready = client.get("/ready").json()["backends"]
        assert ready["hybrid-engine"]["state"] == ready["span-remote:always-hybrid"]["state"] == "open"
        assert ready["transformer-engine"]["state"] == "closed"
        metrics = client.get("/metrics").text
        assert 'archroute_breaker_open{backend="hybrid-engine"} 1.0' in metrics
        assert 'archroute_breaker_open{backend="transformer-engine"} 0.0' in metrics
        assert 'archroute_backend_failures_total{backend="span-remote:always-hybrid"} 1.0' in metrics
        r = client.post("/v1/completions", json={"model": "hybrid-engine", "prompt": "x",
                                                 "max_tokens": 4})
        assert r.status_code == 503 and "cooling down" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "span-h", "prompt": "x",
                                                 "max_tokens": 4})
        assert r.status_code == 503 and engines["hybrid"].failures == 1  # not sent again


# ---- `archroute` over two engines: the built-in span profile takes learned-topk -----------

def _engine_backends(tokenizer: bool = True) -> dict:
    """Two upstream backends whose ports refuse connections (nothing is sent at start), the
    transformer's tokenizer the reference pair's when ``tokenizer``."""
    from models.reference_pair import REFERENCE_DIR
    from tests.router.servers import free_port

    out = {role: {"name": f"{role}-engine", "kind": "upstream", "model": "m",
                  "base_url": f"http://127.0.0.1:{free_port()}/v1"}
           for role in ("transformer", "hybrid")}
    if tokenizer:
        out["transformer"]["tokenizer"] = str(REFERENCE_DIR / "transformer")
    return out


def test_the_built_in_span_profile_over_engines_uses_the_gate_trained_for_them(tmp_path):
    """Over two engines the built-in archroute-span's gate is learned-topk (no drafting: the
    engines decode the spans), so `archroute` is span routing there: /v1/models and the
    decision say so and which gate. In-process the built-in keeps its gate; a profile a file
    configures keeps the gate it names."""
    from models.span.decoder import default_gate_name

    assert load_settings(environ={}).profiles["archroute-span"].span_gate == default_gate_name()
    settings = load_settings(overrides={"backends": _engine_backends(), "decision_log": ""},
                             environ={})
    prof = settings.profiles["archroute-span"]
    assert (prof.span_gate, prof.span_draft[0]) == ("learned-topk", 0)
    with TestClient(create_app(settings)) as client:
        card = client.get("/v1/models/archroute").json()
        assert (card["alias_of"], card["routing"], card["gate"]) == (
            "archroute-span", "span", "learned-topk")
        span_card = client.get("/v1/models/archroute-span").json()
        assert (span_card["gate"], span_card["draft_k"]) == ("learned-topk", 0)
        assert client.app.state.service.span.slot("learned-topk").name == \
            "span-remote:learned-topk"
        r = client.post("/v1/route", json={"model": "archroute", "messages": CODE})
        assert r.status_code == 200, r.text
        assert r.headers["x-archroute-arch"] == "span"
        assert (r.json()["profile"], r.json()["policy"]) == ("archroute-span", "span")
    # configured (a file's profiles): the gate it names stays, learned-topk as well
    (tmp_path / "r.yaml").write_text(json.dumps({"profiles": {
        "archroute-span": {"policy": "span", "policy_args": {"gate": "copy-2"}}}}))
    configured = load_settings(tmp_path / "r.yaml", overrides={"backends": _engine_backends()},
                               environ={})
    assert configured.profiles["archroute-span"].span_gate == "copy-2"


@pytest.mark.parametrize("how", ["file", "flag"])
def test_a_configured_learned_gate_over_engines_is_still_refused(how, tmp_path):
    """`learned` named for engines is never replaced: the router does not start, one line
    naming the profile, the setting and the gate that ships for engines."""
    prof = {"archroute-span": {"policy": "span", "policy_args": {"gate": "learned"}}}
    if how == "file":
        (tmp_path / "r.yaml").write_text(json.dumps({"profiles": prof}))
        settings = load_settings(tmp_path / "r.yaml", overrides={
            "backends": _engine_backends(), "decision_log": ""}, environ={})
    else:
        settings = load_settings(overrides={"backends": _engine_backends(), "profiles": prof,
                                            "decision_log": ""}, environ={})
    assert settings.profiles["archroute-span"].span_gate == "learned"
    with pytest.raises(SettingsError) as exc, TestClient(create_app(settings)):
        pass
    msg = str(exc.value)
    assert msg.startswith("invalid settings: profiles.archroute-span: cannot span-decode on "
                          "this pair (profiles.archroute-span.policy_args.gate): ")
    assert "entropy" in msg and "learned-topk" in msg and "\n" not in msg


def test_archroute_over_engines_without_a_tokenizer_routes_per_request(tmp_path):
    """No tokenizer setting: the built-in span profile (learned-topk) is not served, and
    `archroute` is the request classifier's profile, its card saying why."""
    settings = load_settings(overrides={"backends": _engine_backends(tokenizer=False),
                                        "decision_log": ""}, environ={})
    assert settings.profiles["archroute-span"].span_gate == "learned-topk"
    with TestClient(create_app(settings)) as client:
        card = client.get("/v1/models/archroute").json()
        assert (card["alias_of"], card["routing"]) == ("archroute-auto", "request")
        assert "backends.transformer.tokenizer" in card["description"]
        r = client.get("/v1/models/archroute-span")
        assert r.status_code == 404 and "tokenizer" in r.json()["error"]["message"]


def _text_token_engine():
    """An engine that takes a token-id prompt but streams its tokens as text (no
    ``token_id:`` names), as an OpenAI-compatible server without vLLM's extension does."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        assert isinstance((await request.json())["prompt"], list)

        async def events():
            yield ('data: {"choices": [{"index": 0, "text": "hi", "logprobs": {"tokens": '
                   '["hi"], "token_logprobs": [-0.1]}, "finish_reason": "length"}]}\n\n')
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


@contextmanager
def _engines_without_token_ids(kind: str):
    """The URL of engines that cannot serve a span's request: ``refuse`` a real
    ``serve-model fake`` process (a token-id prompt is a 400), ``text`` a real uvicorn server
    streaming text tokens."""
    from tests.router.servers import Server
    from tests.router.test_tools import thread_server

    if kind == "text":
        with thread_server(_text_token_engine()) as url:
            yield url
        return
    srv = Server(["serve-model", "fake", "--name", "m"]).wait_ready()
    try:
        yield srv.url
    finally:
        srv.stop()


NO_TOKEN_IDS = {"refuse": "does not take token-id prompts", "text": "does not stream token ids"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(NO_TOKEN_IDS))
def test_engines_that_cannot_take_token_ids_leave_archroute_per_request(kind, tmp_path):
    """Engines with the tokenizer set that refuse a token-id prompt, or stream no token ids,
    asked once at start: the built-in span profile is not served and `archroute` is
    archroute-auto, its card saying which engine and why; a span profile the configuration
    names stops the router, one line naming the engine's backend."""
    why = NO_TOKEN_IDS[kind]
    with _engines_without_token_ids(kind) as url:
        backends = _engine_backends()
        for b in backends.values():
            b["base_url"] = url + "/v1"
        settings = load_settings(overrides={"backends": backends, "decision_log": ""},
                                 environ={})
        with TestClient(create_app(settings)) as client:
            card = client.get("/v1/models/archroute").json()
            assert (card["alias_of"], card["routing"]) == ("archroute-auto", "request")
            assert "the transformer engine 'transformer-engine'" in card["description"]
            assert why in card["description"]
            r = client.post("/v1/chat/completions", json={"model": "archroute-span",
                                                          "messages": CODE})
            assert r.status_code == 404 and why in r.json()["error"]["message"]
        settings = load_settings(overrides={"backends": backends, "decision_log": "",
                                            "profiles": SPAN_PROFILE}, environ={})
        with pytest.raises(SettingsError) as exc, TestClient(create_app(settings)):
            pass
    msg = str(exc.value)
    assert msg.startswith("invalid settings: profiles.s: cannot span-decode on this pair "
                          "(backends.transformer): the transformer engine")
    assert why in msg and "\n" not in msg


def test_span_profile_gate_with_wrappers_is_checked_at_start():
    ok = load_settings(overrides={"profiles": {"mixing": {
        "policy": "span", "policy_args": {"gate": "copy-2+copy-8-prompt-2+mix-0.5"}}}},
        environ={})
    assert ok.profiles["mixing"].span_gate == "copy-2+copy-8-prompt-2+mix-0.5"
    for bad in ("copy-2+mix-0", "copy-2+mix-11", "copy-2+copy-9", "nope+mix-1"):
        with pytest.raises(SettingsError, match="unknown gate"):
            load_settings(overrides={"profiles": {"mixing": {
                "policy": "span", "policy_args": {"gate": bad}}}}, environ={})
