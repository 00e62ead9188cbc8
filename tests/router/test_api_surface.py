"""Issue #15's API surface: the served backend in every response shape (official SDK against
a real server), the ``archroute`` model alias, ``max_tokens`` up to the context on the
embedded pair, ``POST /v1/route``, chat apps' side requests (and the decision log's ``side``
column), ``explain``, and a disconnect stopping in-process generation."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from classifiers.explain import describe, reasons
from models.base import ChatMessage, GenerationParams
from models.fake import FakeBackend, fake_tokens
from router.app import create_app
from router.decision_log import MIGRATIONS, DecisionLog, DecisionRow
from router.settings import load_settings
from router.side import is_side_request
from tests.router.conftest import Fakes, assert_envelope
from tests.router.servers import CODE_GEN, Server, free_port, serve_config

COPY = [{"role": "user", "content": "Repeat this exactly: the cat sat on the mat."}]
PROSE = [{"role": "user", "content": "Write a short poem about the sea at dusk."}]
CODE_FIX = [{"role": "user", "content": "Fix the bug in this function:\n```python\n"
                                        "def add(a, b):\n    return a - b\n```"}]
QUESTION = [{"role": "user", "content": "What is the capital of France, and why is it famous?"}]
# Open WebUI's title and tags task prompts (its default templates, chat history filled in);
# the history holds a copy request, which the rules alone would send to the transformer
HISTORY = ("### Chat History:\n<chat_history>\nUSER: Repeat this exactly: the cat sat on the "
           "mat.\nASSISTANT: the cat sat on the mat.\n</chat_history>")
OWUI_TITLE = ("### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat "
              "history.\n### Guidelines:\n- The title should clearly represent the main theme "
              "or subject of the conversation.\n- Use emojis that enhance understanding of the "
              "topic, but avoid quotation marks or special formatting.\n### Output:\nJSON "
              'format: { "title": "your concise title here" }\n' + HISTORY)
OWUI_TAGS = ("### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat "
             "history, along with 1-3 more specific subtopic tags.\n### Output:\nJSON format: "
             '{ "tags": ["tag1", "tag2", "tag3"] }\n' + HISTORY)
TITLE_TASK = [*COPY, {"role": "assistant", "content": "the cat sat on the mat."},
              {"role": "user", "content": OWUI_TITLE}]

ROUTE_KEYS = {"object", "model", "profile", "policy", "score", "threshold", "decision",
              "backend", "available", "side_request", "reasons", "features", "fallback_from",
              "overhead_ms"}


def chat(client: TestClient, messages, model: str = "archroute", **kw) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, **kw})


def sse(text: str) -> list[dict]:
    """The JSON events of an SSE body ([DONE] checked and dropped)."""
    data = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# --- 1, 2: the official SDK against a real server on fake backends ---------------------

T_REPLY, H_REPLY = "from the transformer side", "from the hybrid"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("surface")
    config = {"backends": {"transformer": {"name": "t-fake", "kind": "fake",
                                           "fake_reply": T_REPLY},
                           "hybrid": {"name": "h-fake", "kind": "fake", "fake_reply": H_REPLY}},
              "decision_log": str(tmp / "decisions.sqlite")}
    s = serve_config(config, tmp)
    yield s
    s.stop()


def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.slow
@pytest.mark.parametrize("messages,backend,reply", [(COPY, "t-fake", T_REPLY),
                                                    (PROSE, "h-fake", H_REPLY)])
def test_sdk_stream_with_usage_names_the_backend_on_every_chunk(server, messages, backend,
                                                                reply) -> None:
    chunks = list(sdk(server).chat.completions.create(
        model="archroute-rules", messages=messages, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    last = chunks[-1]
    assert last.choices == []
    n_prompt = len(fake_tokens(messages[0]["content"]))  # the fake counts its own "tokens"
    n_out = len(fake_tokens(reply))
    assert (last.usage.prompt_tokens, last.usage.completion_tokens,
            last.usage.total_tokens) == (n_prompt, n_out, n_prompt + n_out)
    assert last.usage.model_extra["archroute_backend"] == backend
    assert all(c.usage is None for c in chunks[:-1])  # usage only on the last chunk
    assert [c.model_extra["archroute"]["backend"] for c in chunks] == [backend] * len(chunks)
    first = chunks[0].model_extra["archroute"]  # the whole decision rides on the first one
    assert first["policy"] == "rules" and first["profile"] == "archroute-rules"
    assert first["decision"] == {"t-fake": "transformer", "h-fake": "hybrid"}[backend]
    assert first["side_request"] is False
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({c.id for c in chunks}) == 1


@pytest.mark.slow
def test_sdk_stream_without_stream_options_has_no_usage(server) -> None:
    chunks = list(sdk(server).chat.completions.create(model="archroute-rules", messages=COPY,
                                                      stream=True))
    assert len(chunks) >= 3 and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # no usage-only chunk either
    assert {c.model_extra["archroute"]["backend"] for c in chunks} == {"t-fake"}


@pytest.mark.slow
def test_sdk_completion_stream_usage_and_backend(server) -> None:
    chunks = list(sdk(server).completions.create(
        model="archroute-rules", prompt="Once upon a time", stream=True, max_tokens=2,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "from the"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert chunks[-1].usage.model_extra["archroute_backend"] == "h-fake"
    assert {c.model_extra["archroute"]["backend"] for c in chunks} == {"h-fake"}


@pytest.mark.slow
def test_sdk_whole_response_names_the_backend(server) -> None:
    c = sdk(server)
    resp = c.chat.completions.create(model="archroute-rules", messages=COPY)
    assert resp.choices[0].message.content == T_REPLY
    assert resp.model_extra["archroute"]["backend"] == "t-fake"
    assert resp.model_extra["archroute"]["decision"] == "transformer"
    assert resp.usage.model_extra["archroute_backend"] == "t-fake"
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + len(fake_tokens(T_REPLY))
    resp = c.chat.completions.create(model="archroute-rules", messages=PROSE)
    assert resp.model_extra["archroute"]["backend"] == "h-fake"
    assert resp.usage.model_extra["archroute_backend"] == "h-fake"
    r = c.completions.create(model="archroute-rules", prompt="Once upon a time")
    assert r.model_extra["archroute"]["backend"] == "h-fake"
    assert r.usage.model_extra["archroute_backend"] == "h-fake"


@pytest.mark.slow
def test_models_lists_the_alias_first_with_owner_and_creation_time(server) -> None:
    data = httpx.get(server.url + "/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    # two fakes cannot span-decode: the built-in archroute-span is not served (router/span.py)
    assert ids[:4] == ["archroute", "archroute-auto", "archroute-cost", "archroute-rules"]
    assert sorted(ids[4:]) == ["h-fake", "t-fake"]  # the backends, in the config's order
    alias = data[0]
    assert alias["kind"] == "profile" and alias["alias_of"] == "archroute-auto"
    assert alias["policy"] == "classifier"
    assert alias["threshold"] == data[1]["threshold"]  # the default profile's own (auto)
    assert {m["owned_by"] for m in data} == {"archroute"}
    created = {m["created"] for m in data}
    assert len(created) == 1  # when the router started
    (t,) = created
    assert isinstance(t, int) and not isinstance(t, bool)
    assert time.time() - 3600 < t <= time.time()
    assert [m["kind"] for m in data[-2:]] == ["backend", "backend"]
    assert {m["id"]: m["role"] for m in data[-2:]} == {"t-fake": "transformer",
                                                        "h-fake": "hybrid"}

    c = sdk(server)
    listed = list(c.models.list())
    assert listed[0].id == "archroute" and listed[0].owned_by == "archroute"
    assert [m.id for m in listed] == ids
    assert c.models.retrieve("archroute").model_extra["alias_of"] == "archroute-auto"


@pytest.mark.slow
def test_the_archroute_alias_serves_chat_with_the_default_profile(server) -> None:
    c = sdk(server)
    raw = c.chat.completions.with_raw_response.create(model="archroute", messages=CODE_FIX)
    assert raw.headers["x-archroute-profile"] == "archroute-auto"
    resp = raw.parse()
    assert resp.model == "archroute"
    ext = resp.model_extra["archroute"]
    assert ext["profile"] == "archroute-auto" and ext["policy"] == "classifier"
    assert ext["backend"] == "t-fake"  # a code fix: the shipped classifier says transformer
    assert resp.choices[0].message.content == T_REPLY
    # the same decision as naming the default profile itself
    direct = c.chat.completions.create(model="archroute-auto", messages=CODE_FIX)
    assert direct.model_extra["archroute"]["score"] == pytest.approx(ext["score"])


# --- 3: max_tokens on the embedded pair: up to the context -----------------------------

WORDS = ("the cat sat on a mat and then it went home to eat some fish while the dog slept "
         "by the warm fire in the old stone house near the sea").split()


@pytest.fixture(scope="module")
def embedded(reference_pair):
    """The router app in-process on the shipped reference pair (no decision log)."""
    t, h = reference_pair
    settings = load_settings(overrides={"decision_log": ""}, environ={})
    app = create_app(settings, backends={"transformer": t, "hybrid": h})
    with TestClient(app) as client:
        yield client, {t.name: t, h.name: h}


def content_filling(backend, n_ids: int) -> str:
    """A user message whose chat prompt is exactly ``n_ids`` tokens for ``backend``, counted
    as the backend counts them (its start token included)."""
    def n(text: str) -> int:
        return 1 + len(backend.encode(backend.render([ChatMessage("user", text)])))

    def words(k: int) -> str:
        return " ".join(WORDS[i % len(WORDS)] for i in range(k))

    lo, hi = 0, n_ids  # the largest k with n(words(k)) <= n_ids
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if n(words(mid)) <= n_ids else (lo, mid - 1)
    text = words(lo)
    while n(text) < n_ids:
        text += " the"
    assert n(text) == n_ids, (n(text), n_ids)
    return text


@pytest.mark.parametrize("name", ["reference-transformer", "reference-hybrid"])
def test_no_max_tokens_generates_up_to_the_context(embedded, name) -> None:
    client, backends = embedded
    b = backends[name]
    ctx = b.context_length
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards[name]["context_length"] == ctx == 1024
    room = 3
    msgs = [{"role": "user", "content": content_filling(b, ctx - room)}]
    r = chat(client, msgs, model=name, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == room
    # usage counts the prompt without the start token: prompt + start + completion = context
    assert body["usage"]["prompt_tokens"] + 1 + body["usage"]["completion_tokens"] == ctx
    assert body["archroute"]["backend"] == name


def test_max_tokens_beyond_the_room_is_cut_to_it(embedded) -> None:
    client, backends = embedded
    b = backends["reference-transformer"]
    room = 4
    msgs = [{"role": "user", "content": content_filling(b, b.context_length - room)}]
    for asked in (room + 1, 500, 5000):  # 5000: above max_tokens_cap too
        r = chat(client, msgs, model=b.name, temperature=0, max_tokens=asked)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == room, asked
    r = chat(client, msgs, model=b.name, temperature=0, max_tokens=room - 2)
    assert r.json()["usage"]["completion_tokens"] == room - 2  # below the room: as asked
    # a stream ends the same way, and so does a raw completion (max_tokens null)
    r = chat(client, msgs, model=b.name, temperature=0, stream=True,
             stream_options={"include_usage": True})
    events = sse(r.text)
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == room
    prompt = b.render([ChatMessage("user", msgs[0]["content"])])
    r = client.post("/v1/completions", json={"model": b.name, "prompt": prompt,
                                             "max_tokens": None, "temperature": 0})
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == room


def test_the_last_token_of_room_is_used(embedded) -> None:
    client, backends = embedded
    b = backends["reference-hybrid"]
    msgs = [{"role": "user", "content": content_filling(b, b.context_length - 1)}]
    r = chat(client, msgs, model=b.name, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1
    assert r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("over", [0, 7])
def test_a_prompt_that_fills_the_context_is_a_400_naming_both_numbers(embedded, over) -> None:
    client, backends = embedded
    b = backends["reference-transformer"]
    n_prompt = b.context_length + over
    msgs = [{"role": "user", "content": content_filling(b, n_prompt)}]
    for extra in ({}, {"max_tokens": 5}, {"stream": True}):
        r = chat(client, msgs, model=b.name, temperature=0, **extra)
        err = assert_envelope(r, 400)
        assert err["type"] == "invalid_request_error"
        msg = err["message"].replace(",", "")  # 1,031 or 1031
        assert f"the prompt is {n_prompt} tokens" in msg, msg
        assert f"{b.context_length} tokens" in msg and b.name in msg, msg


# --- 4: POST /v1/route -----------------------------------------------------------------

def _route_then_chat(client: TestClient, body: dict) -> tuple[dict, dict]:
    r = client.post("/v1/route", json=body)
    assert r.status_code == 200, r.text
    c = client.post("/v1/chat/completions", json=body)
    assert c.status_code == 200, c.text
    assert c.headers["x-archroute-backend"] == c.json()["archroute"]["backend"]
    return r.json(), c.json()["archroute"]


ROUTE_CASES = [
    # (body, backend expected)
    ({"model": "archroute", "messages": CODE_FIX}, "t-fake"),
    ({"model": "archroute", "messages": CODE_GEN}, "h-fake"),
    ({"model": "archroute", "messages": QUESTION}, "t-fake"),  # 0.433 on the tuned pair
    # PROSE scores 0.395: over the robust threshold, under the expected-gap one (0.5)
    ({"model": "archroute-auto", "messages": PROSE, "archroute": {"threshold": 0.5}}, "h-fake"),
    ({"model": "archroute", "messages": TITLE_TASK}, "h-fake"),  # a side request
    ({"model": "archroute-rules", "messages": COPY}, "t-fake"),
    ({"model": "archroute-rules", "messages": PROSE}, "h-fake"),
    ({"model": "archroute", "messages": QUESTION, "archroute": {"threshold": 0.0}}, "t-fake"),
    ({"model": "archroute", "messages": CODE_FIX, "archroute": {"threshold": 1.01}}, "h-fake"),
    ({"model": "h-fake", "messages": CODE_FIX}, "h-fake"),  # a backend named: no routing
]


def test_route_returns_what_chat_then_serves(fakes) -> None:
    f, client = fakes
    thresholds = {m["id"]: m.get("threshold") for m in client.get("/v1/models").json()["data"]}
    for body, expected in ROUTE_CASES:
        calls = (len(f.transformer.calls), len(f.hybrid.calls))
        r = client.post("/v1/route", json=body)
        assert r.status_code == 200, r.text
        route = r.json()
        assert (len(f.transformer.calls), len(f.hybrid.calls)) == calls  # nothing generated
        assert ROUTE_KEYS <= set(route), set(route) ^ ROUTE_KEYS
        assert route["object"] == "archroute.route" and route["model"] == body["model"]
        assert route["backend"] == expected, (body, route)
        assert route["available"] is True and route["fallback_from"] is None
        assert isinstance(route["reasons"], list)
        assert all(isinstance(x, str) and x for x in route["reasons"])
        assert route["reasons"]
        if route["policy"] == "rules" and not any(route["features"].values()):
            assert route["reasons"] == [  # no rule fired: the rules' base score decided
                "no cue fired: the score is the policy's starting point"]
        _, served = _route_then_chat(client, body)
        for k in ("profile", "policy", "decision", "backend", "threshold", "side_request"):
            assert served[k] == route[k], (body, k, served[k], route[k])
        if route["score"] is None:
            assert served["score"] is None
        else:
            assert served["score"] == pytest.approx(route["score"])
        if route["policy"] in ("classifier", "rules"):
            assert 0.0 <= route["score"] <= 1.0 and route["features"]
            assert all(isinstance(v, float | int) for v in route["features"].values())
            want = body.get("archroute", {}).get("threshold", thresholds[body["model"]])
            assert route["threshold"] == pytest.approx(want)
    side = client.post("/v1/route", json={"model": "archroute", "messages": TITLE_TASK}).json()
    assert side["side_request"] is True and side["policy"] == "side-request"
    assert side["score"] is None and side["profile"] == "archroute-auto"
    fix = client.post("/v1/route", json={"model": "archroute", "messages": CODE_FIX}).json()
    assert fix["policy"] == "classifier" and fix["features"]["task_fix"] > 0
    assert fix["score"] >= fix["threshold"]


def test_route_scores_exactly_as_chat_without_a_decision_log(tmp_path: Path) -> None:
    """Without the decision log the chat endpoint scores with ``policy.score`` and /v1/route
    with ``policy.explain``: the two must agree."""
    f = Fakes(tmp_path, decision_log="")
    with TestClient(f.app) as client:
        for msgs in (CODE_FIX, QUESTION, PROSE, COPY):
            for model in ("archroute", "archroute-cost", "archroute-rules"):
                route, served = _route_then_chat(client, {"model": model, "messages": msgs})
                assert served["score"] == pytest.approx(route["score"], abs=1e-9)
                assert served["backend"] == route["backend"]


def test_route_says_unavailable_while_the_breaker_is_open(fakes) -> None:
    f, client = fakes
    f.transformer.fail(3)  # failure_threshold: 3 consecutive failures open the breaker
    for _ in range(3):
        assert chat(client, PROSE, model="t-fake").status_code == 502
    route = client.post("/v1/route", json={"model": "archroute", "messages": CODE_FIX}).json()
    assert route["backend"] == "t-fake" and route["available"] is False
    served = chat(client, CODE_FIX).json()["archroute"]
    assert served["backend"] == "h-fake" and served["fallback_from"] == "t-fake"


@pytest.mark.parametrize("content,param", [
    (b"{oops", None),
    (json.dumps({"model": "archroute"}).encode(), "messages"),
    (json.dumps({"model": "archroute", "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": "archroute", "messages": []}).encode(), "messages"),
    (json.dumps({"messages": COPY}).encode(), "model"),
    (json.dumps({"model": "archroute", "messages": COPY,
                 "archroute": {"threshold": 7}}).encode(), "archroute.threshold"),
])
def test_route_bad_bodies_are_400_envelopes(fakes, content: bytes, param: str | None) -> None:
    _, client = fakes
    r = client.post("/v1/route", content=content, headers={"content-type": "application/json"})
    err = assert_envelope(r, 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_route_unknown_model_is_a_404_envelope(fakes) -> None:
    _, client = fakes
    r = client.post("/v1/route", json={"model": "gpt-4o", "messages": COPY})
    err = assert_envelope(r, 404, "model_not_found")
    assert err["param"] == "model" and "'gpt-4o'" in err["message"]
    assert "archroute" in err["message"]


# --- 5: side requests ------------------------------------------------------------------

def _log_rows(f: Fakes) -> dict[str, dict]:
    f.app.state.service.decision_log.flush()
    con = sqlite3.connect(f.settings.decision_log)
    con.row_factory = sqlite3.Row
    try:
        return {r["request_id"]: dict(r) for r in con.execute("SELECT * FROM decisions")}
    finally:
        con.close()


def test_side_requests_go_to_the_hybrid_unscored_and_are_logged_as_side(fakes) -> None:
    f, client = fakes
    # the rules would send this to the transformer (its history asks to copy)
    assert client.post("/v1/route", json={
        "model": "archroute-rules", "messages": [{"role": "user", "content": HISTORY}]},
    ).json()["decision"] == "transformer"
    r = chat(client, TITLE_TASK, model="archroute-rules")
    assert r.status_code == 200
    assert r.headers["x-archroute-policy"] == "side-request"
    assert "x-archroute-score" not in r.headers
    side = r.json()
    ext = side["archroute"]
    assert ext["side_request"] is True and ext["policy"] == "side-request"
    assert ext["backend"] == "h-fake" and ext["decision"] == "hybrid" and ext["score"] is None
    assert side["choices"][0]["message"]["content"] == "from hybrid"
    tags = chat(client, [{"role": "user", "content": OWUI_TAGS}], stream=True)
    events = sse(tags.text)
    assert events[0]["archroute"]["side_request"] is True
    assert events[0]["archroute"]["backend"] == "h-fake"
    normal = chat(client, COPY, model="archroute-rules").json()
    assert normal["archroute"]["side_request"] is False
    assert normal["archroute"]["backend"] == "t-fake"

    rows = _log_rows(f)
    assert rows[side["id"]]["side"] == 1 and rows[events[0]["id"]]["side"] == 1
    assert rows[side["id"]]["policy"] == "side-request" and rows[side["id"]]["score"] is None
    assert rows[side["id"]]["backend"] == "h-fake"
    assert rows[normal["id"]]["side"] == 0 and rows[normal["id"]]["policy"] == "rules"
    # side requests stay out of the decision counters
    metrics = client.get("/metrics").text
    counted = [ln for ln in metrics.splitlines() if ln.startswith("archroute_decisions_total")]
    assert counted == ['archroute_decisions_total{backend="transformer",policy="rules"} 1.0'], \
        counted  # the normal chat only: the /v1/route call above asked without serving


def test_side_requests_to_the_transformer_or_routed(tmp_path: Path) -> None:
    f = Fakes(tmp_path / "t", side_requests="transformer")
    with TestClient(f.app) as client:
        ext = chat(client, [{"role": "user", "content": OWUI_TAGS}]).json()["archroute"]
        assert (ext["backend"], ext["side_request"], ext["policy"]) == \
            ("t-fake", True, "side-request")
    f = Fakes(tmp_path / "r", side_requests="route")
    with TestClient(f.app) as client:
        r = chat(client, TITLE_TASK, model="archroute-rules")
        ext = r.json()["archroute"]
        assert (ext["side_request"], ext["policy"]) == (False, "rules")
        assert ext["backend"] == "t-fake" and ext["score"] >= 0.5  # the copy cue in its history
        route = client.post("/v1/route", json={"model": "archroute-rules",
                                               "messages": TITLE_TASK}).json()
        assert route["side_request"] is False and route["backend"] == "t-fake"
        assert _log_rows(f)[r.json()["id"]]["side"] == 0


def test_side_requests_are_only_recognised_in_chat_by_the_last_user_turn(fakes) -> None:
    _, client = fakes
    # a completion prompt is never a side request; nor is a task prompt from the past
    r = client.post("/v1/completions", json={"model": "archroute-rules", "prompt": OWUI_TITLE})
    assert r.json()["archroute"]["side_request"] is False
    earlier = [{"role": "user", "content": OWUI_TITLE}, {"role": "assistant", "content": "ok"},
               *COPY]
    ext = chat(client, earlier, model="archroute-rules").json()["archroute"]
    assert ext["side_request"] is False and ext["backend"] == "t-fake"


OLD_SCHEMA = """
CREATE TABLE decisions (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, request_id TEXT NOT NULL,
    endpoint TEXT NOT NULL, model TEXT NOT NULL, profile TEXT, policy TEXT, score REAL,
    threshold REAL, decision TEXT, backend TEXT, fallback_from TEXT, features TEXT,
    latency_ms REAL, overhead_ms REAL, prompt_tokens INTEGER, completion_tokens INTEGER,
    stream INTEGER, status INTEGER, error TEXT, prompt TEXT
)"""


def test_an_old_decision_log_gains_the_side_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute(OLD_SCHEMA)
    con.execute("INSERT INTO decisions (time, request_id, endpoint, model, status) "
                "VALUES (1.0, 'old-1', 'chat', 'archroute', 200)")
    con.commit()
    con.close()
    for i in range(2):  # opening an already migrated file again is fine too
        dlog = DecisionLog(path)
        dlog.write(DecisionRow(f"new-{i}", "chat", "archroute", side=i == 0,
                               span={"gate": "copy-2", "hybrid": 3} if i else None))
        dlog.flush()
        dlog.close()
    con = sqlite3.connect(path)
    cols = [r[1] for r in con.execute("PRAGMA table_info(decisions)")]
    rows = dict(con.execute("SELECT request_id, side FROM decisions").fetchall())
    spans = dict(con.execute("SELECT request_id, span FROM decisions").fetchall())
    con.close()
    assert cols.count("side") == cols.count("span") == 1
    assert cols[-len(MIGRATIONS):] == list(MIGRATIONS)  # added in order, after the old ones
    assert rows == {"old-1": 0, "new-0": 1, "new-1": 0}
    assert spans == {"old-1": None, "new-0": None, "new-1": '{"gate": "copy-2", "hybrid": 3}'}


# --- 6: explain ------------------------------------------------------------------------

@pytest.mark.parametrize("model,messages,expect", [
    ("archroute", CODE_FIX, None),
    ("archroute-auto", QUESTION, None),
    ("archroute-rules", COPY, "asks to copy, quote or repeat (towards the transformer)"),
    ("archroute-rules", CODE_FIX, "contains code or markup (towards the transformer)"),
])
def test_explain_adds_reasons(fakes, model, messages, expect) -> None:
    _, client = fakes
    plain = chat(client, messages, model=model).json()["archroute"]
    assert "reasons" not in plain
    off = chat(client, messages, model=model, archroute={"explain": False}).json()["archroute"]
    assert "reasons" not in off
    ext = chat(client, messages, model=model, archroute={"explain": True}).json()["archroute"]
    why = ext["reasons"]
    assert isinstance(why, list) and 1 <= len(why) <= 3
    assert all(isinstance(x, str) and (x.endswith(("(towards the transformer)",
                                                   "(towards the hybrid)"))
                                       or x.startswith("starting point: the ")) for x in why)
    assert any(x.endswith(")") and not x.startswith("starting point") for x in why)
    if expect is not None:
        assert why[0] == expect
    # the same reasons as /v1/route, and the same decision as without explain
    route = client.post("/v1/route", json={"model": model, "messages": messages}).json()
    assert route["reasons"] == why
    assert (ext["backend"], ext["score"]) == (plain["backend"], pytest.approx(plain["score"]))
    # a stream carries them on its first event
    events = sse(chat(client, messages, model=model, stream=True,
                      archroute={"explain": True}).text)
    assert events[0]["archroute"]["reasons"] == why
    assert all("reasons" not in e.get("archroute", {}) for e in events[1:])


def test_explain_on_a_side_request_and_a_named_backend_still_gives_reasons(fakes) -> None:
    _, client = fakes
    for model, messages, word in (("archroute", TITLE_TASK, "side request"),
                                  ("t-fake", CODE_FIX, "routing bypassed")):
        ext = chat(client, messages, model=model, archroute={"explain": True}).json()["archroute"]
        assert len(ext["reasons"]) == 1 and word in ext["reasons"][0]
        assert "reasons" not in chat(client, messages, model=model).json()["archroute"]


# --- 7: a consumer that stops reading stops the decoding -------------------------------

class _CountingModel:
    """Wraps a model to count forward passes (one per decode step)."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


@pytest.fixture()
def endless(reference_pair, monkeypatch):
    """The reference transformer, counting its forward passes and never ending on EOS (so a
    generation without max_tokens runs to the end of the context unless stopped)."""
    b = reference_pair[0]
    counter = _CountingModel(b.model)
    monkeypatch.setattr(b, "model", counter)
    monkeypatch.setattr(b, "eos_ids", set())
    return b, counter


def _step_s(b) -> float:
    """Seconds per decode step, from 8 greedy steps on a short prompt."""
    b.generate("Once upon a time", GenerationParams(max_tokens=2, temperature=0))  # warm up
    t = time.perf_counter()
    r = b.generate("Once upon a time", GenerationParams(max_tokens=8, temperature=0))
    assert r.completion_tokens == 8
    return (time.perf_counter() - t) / 8


def test_closing_astream_stops_decoding_and_frees_the_backend(endless) -> None:
    b, counter = endless
    step = _step_s(b)
    prompt = [ChatMessage("user", "Tell me a long story about the sea.")]
    room = b.context_length - 1 - len(b.encode(b.render(prompt)))
    assert room > 900  # a whole generation: room decode steps

    async def main() -> tuple[float, float, int, int, bool, int]:
        agen = b.astream(prompt, GenerationParams(max_tokens=None, temperature=0))
        got = [await agen.__anext__() for _ in range(2)]
        assert all(c.finish_reason is None for c in got)
        counter.calls = 0
        t = time.perf_counter()
        await agen.aclose()
        close_s = time.perf_counter() - t
        after_close = counter.calls
        locked = b.forward_lock.locked()
        await asyncio.sleep(0.05)
        settled = counter.calls
        t = time.perf_counter()
        nxt = await b.agenerate(prompt, GenerationParams(max_tokens=2, temperature=0))
        return close_s, time.perf_counter() - t, after_close, settled, locked, \
            nxt.completion_tokens

    close_s, next_s, after_close, settled, locked, n_next = asyncio.run(main())
    full_s = room * step
    assert after_close < 0.05 * room, after_close  # steps run after the consumer stopped
    assert settled == after_close  # and none once aclose returned: the worker is done
    assert not locked  # the forward lock is free again
    assert close_s < max(0.2 * full_s, 50 * step), (close_s, full_s)
    assert n_next == 2
    assert next_s < max(0.2 * full_s, 50 * step), (next_s, full_s)


@pytest.mark.slow
def test_a_client_that_disconnects_stops_its_generation(endless) -> None:
    """End to end: a streamed chat through a real server, the client leaves after two
    events; the backend stops decoding and serves the next request at once."""
    import uvicorn

    b, counter = endless
    step = _step_s(b)
    settings = load_settings(overrides={"decision_log": ""}, environ={})
    app = create_app(settings, backends={"transformer": b,
                                         "hybrid": FakeBackend("reference-hybrid", "hybrid")})
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        body = {"model": b.name, "stream": True, "temperature": 0,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        with httpx.Client(timeout=30) as client:
            counter.calls = 0
            with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                n = 0
                for line in r.iter_lines():
                    n += line.startswith("data: ")
                    if n == 3:  # the role event and two pieces of text
                        break
            left = time.perf_counter()
            # the slot is released once the worker stopped
            while client.get(url + "/ready").json()["backends"][b.name]["in_flight"]:
                assert time.perf_counter() - left < 30, "generation not stopped"
                time.sleep(0.01)
            freed_s = time.perf_counter() - left
            steps = counter.calls
            t = time.perf_counter()
            r = client.post(url + "/v1/chat/completions",
                            json={**body, "stream": False, "max_tokens": 2})
            next_s = time.perf_counter() - t
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        full_s = (b.context_length - 30) * step
        assert steps < 200, steps  # of about a thousand the context had room for
        assert freed_s < max(0.25 * full_s, 0.5), (freed_s, full_s)
        assert next_s < max(0.25 * full_s, 0.5), (next_s, full_s)
    finally:
        srv.should_exit = True
        thread.join(10)


# --- 8: units: explain.reasons and side.is_side_request --------------------------------

def test_reasons_rank_by_size_say_the_direction_and_cut_small_ones() -> None:
    feats = {"task_fix": 1.0, "payload_share": 0.8, "ends_with_question": 1.0,
             "options_listed": 0.0, "text_logit": -2.0}
    contrib = {"task_fix": 0.5, "payload_share": 1.2, "ends_with_question": -0.9,
               "options_listed": 0.02, "text_logit": -0.04}
    assert reasons(feats, contrib) == [
        "80% of the last message is one attached block (towards the transformer)",
        "ends with a question (towards the hybrid)",
        "asks to fix or correct something (towards the transformer)",
    ]
    assert reasons(feats, contrib, limit=1) == [
        "80% of the last message is one attached block (towards the transformer)"]
    # min_share: contributions under that share of the largest are left out
    assert len(reasons(feats, contrib, limit=5)) == 3  # 0.04 / 1.2 < 0.05
    assert reasons(feats, contrib, limit=5, min_share=0.03) == [
        *reasons(feats, contrib),
        "its wording resembles requests the hybrid served better (towards the hybrid)"]
    assert len(reasons(feats, contrib, limit=5, min_share=0.0)) == 5
    assert reasons(feats, contrib, min_share=0.5) == reasons(feats, contrib, limit=2)
    # all zero: nothing moved the score
    assert reasons(feats, dict.fromkeys(contrib, 0.0)) == [
        "no cue fired: the score is the policy's starting point"]
    # no contributions (a policy that has none): the features that are set, unranked
    assert reasons({"task_fix": 1.0, "task_list": 0.0, "code_cue": 1.0}) == [
        "asks to fix or correct something", "contains code or markup"]
    # the classifier's starting point (its mean score) is one entry like the others
    assert reasons({"task_fix": 1.0}, {"task_fix": 0.3, "base": -0.6}) == [
        "starting point: the hybrid (the backend the training requests favour on average)",
        "asks to fix or correct something (towards the transformer)"]
    # unknown features are named with their value
    assert reasons({"odd": 0.25}, {"odd": -1.0}) == ["odd = 0.25 (towards the hybrid)"]


def test_feature_descriptions() -> None:
    assert describe("task_fix", 0.0) == "does not ask to fix or correct something"
    assert describe("task_math", 0.0) == "does not read as a math or counting problem"
    assert describe("payload_chars_log", 6.908755) == "the attached block is 1,000 characters"
    assert describe("payload_code", 1.0) == "the attached block looks like code"
    assert describe("payload_code", 0.5) == "the attached block reads as prose"
    assert describe("options_listed", 4.0) == "lists 4 answer options"


SIDE = [
    OWUI_TITLE,
    OWUI_TAGS,
    "### Task:\nSuggest 3-5 relevant follow-up questions or prompts that the user might "
    "naturally ask next in this conversation, based on the chat history.",
    "### Task:\nAnalyze the chat history to determine the necessity of generating search "
    "queries, in the given language.",
    # LibreChat (classic, agents, assistants)
    "Please generate a concise, 5-word-or-less title for the conversation, using its same "
    "language, with no punctuation. Apply title case conventions appropriate for the language.",
    "Provide a concise, 5-word-or-less title for the conversation, using title case "
    "conventions. Only return the title itself.\n\nConversation:\nUser: hi\nAI: hello",
    "Please generate a concise title (max 40 characters) for a conversation that starts with "
    "the following message: how do I bake bread?",
    # LobeChat: the conversation first, the request at the end (English and Chinese)
    "user: how do I bake bread?\nassistant: " + "Mix flour, water and yeast. " * 120
    + "\n\nPlease summarize the above conversation into a title within 10 characters, "
    "without punctuation marks, output language: en-US",
    "user: 你好\nassistant: 你好！\n\n请总结上述对话为10个字以内的标题，不需要包含标点符号，"
    "输出语言语种为：zh-CN",
    "Generate a concise title for this conversation.",
]
NOT_SIDE = [
    "What is a good title for my essay about whales?",
    "Please generate a short title for my novel about a lighthouse keeper.",
    "Please generate a concise title for my blog post about sourdough bread.",
    "Suggest a title for my talk on Rust's borrow checker.",
    "Write a title for the chat app landing page I am building.",
    "In a markdown template, what does ### Task: at the top of a section mean?",
    "Fix this HTML: <html><head><title>My page</title></head></html>",
    "Summarize this article in three bullet points:\n" + "The title race is open. " * 40,
    "Repeat this exactly: the cat sat on the mat.",
]


@pytest.mark.parametrize("text", SIDE)
def test_side_request_prompts_are_recognised(text: str) -> None:
    assert is_side_request(text)


@pytest.mark.parametrize("text", NOT_SIDE)
def test_ordinary_prompts_about_titles_are_not_side_requests(text: str) -> None:
    assert not is_side_request(text)


# --- #21 D8: an OpenAPI document that says what the router answers; N8: what clients read
# of failures is ours (the details go to the log, with the request id) ---------------------

ENVELOPE_REF = "#/components/schemas/ErrorEnvelope"


def test_openapi_declares_the_real_errors_and_media_types(fakes) -> None:
    _, client = fakes
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = paths[path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "413", "429", "502", "503",
                                  "504"}, path
        for status, r in responses.items():
            if status != "200":
                assert r["content"]["application/json"]["schema"]["$ref"] == ENVELOPE_REF
        assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"])
    assert set(paths["/v1/models/{model_id}"]["get"]["responses"]) == {"200", "401", "404"}
    assert "422" not in json.dumps(paths)
    env = schema["components"]["schemas"]
    assert set(env["ErrorObject"]["properties"]) == {"message", "type", "param", "code"}
    assert "HTTPValidationError" not in env
    # and the declared envelope is what an error looks like
    assert_envelope(chat(client, COPY, model="nope"), 404, "model_not_found")


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/v1/chat/completions", "POST"), ("DELETE", "/v1/models", "GET"),
    ("PUT", "/admin/reload", "POST")])
def test_405_names_the_allowed_methods(tmp_path: Path, method, path, allow) -> None:
    f = Fakes(tmp_path)
    with TestClient(f.app, client=("127.0.0.1", 50000)) as client:
        r = client.request(method, path)
    assert_envelope(r, 405, "method_not_allowed")
    assert r.headers["allow"] == allow


def status_error(status: int, text: str):
    from models.upstream import UpstreamRequestError, UpstreamStatusError

    cls = UpstreamRequestError if status < 500 else UpstreamStatusError

    def fail(prompt, params):
        raise cls(f"upstream HTTP {status}: {text}", status)
    return fail


SECRET = "db password hunter2 at /srv/llm/config.py line 9"


def test_upstream_error_text_is_logged_not_sent(fakes, caplog) -> None:
    f, client = fakes
    f.transformer.generate = f.hybrid.generate = status_error(500, SECRET)  # type: ignore
    with caplog.at_level("INFO"):
        r = chat(client, COPY, model="archroute-rules")
    err = assert_envelope(r, 502, "backend_failed")
    assert err["message"] == "upstream backend t-fake failed (HTTP 500)"  # the first one tried
    assert "hunter2" not in r.text and "/srv" not in r.text
    rid = r.headers.get("x-request-id")
    logged = [m for m in caplog.messages if "hunter2" in m]
    assert logged and all("chatcmpl-" in m for m in logged), caplog.messages
    if rid:
        assert any(rid in m for m in logged)

    f.transformer.generate = f.hybrid.generate = status_error(400, SECRET)  # type: ignore
    failures = f.app.state.service.slots["transformer"].failures
    r = chat(client, COPY, model="archroute-rules")
    err = assert_envelope(r, 400)
    assert err["message"] == "upstream backend t-fake refused the request (HTTP 400)"
    assert "hunter2" not in r.text
    slot = f.app.state.service.slots["transformer"]
    assert slot.failures == failures  # the request's fault: not counted, no fallback


def test_only_request_errors_are_400_and_a_bug_is_a_500(fakes, caplog) -> None:
    f, client = fakes
    svc = f.app.state.service

    async def bug(*a, **k):
        raise ValueError(f"bug: {SECRET}")

    # a content part that is not text: the request's fault, said as such
    r = client.post("/v1/chat/completions", json={"model": "archroute-rules", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert "not supported" in assert_envelope(r, 400)["message"]
    original = svc.route
    svc.route = bug  # type: ignore[method-assign]
    try:
        with caplog.at_level("ERROR"):
            for model in ("archroute-rules", "archroute-auto"):
                r = chat(client, COPY, model=model)
                err = assert_envelope(r, 500, "internal_error")
                assert err["type"] == "server_error" and "hunter2" not in r.text
            r = client.post("/v1/route", json={"model": "archroute", "messages": COPY})
            assert_envelope(r, 500, "internal_error")
    finally:
        svc.route = original  # type: ignore[method-assign]
    assert any("chatcmpl-" in m for m in caplog.messages if "unexpected error" in m)
    assert chat(client, COPY, model="archroute-rules").status_code == 200


def test_serve_model_request_checks_stay_400s() -> None:
    """`archroute serve-model` shares the mapper: a request's own checks are 400s there too
    (a plain ValueError elsewhere is a 500 now, #21)."""
    from router.model_server import create_model_app

    with TestClient(create_model_app(FakeBackend("m"))) as client:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
        assert "not supported" in assert_envelope(r, 400)["message"]
        r = client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"]})
        assert "one prompt per request" in assert_envelope(r, 400)["message"]
