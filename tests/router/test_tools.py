"""Issue #15: tool calling. Tool definitions and a conversation's tool turns reach an upstream
that calls tools exactly as the client sent them; its tool calls come back whole
(``message.tool_calls``) and streamed (``delta.tool_calls``); backends that cannot call tools
get the request without them and a warning header (``tools: auto``/``drop``), or the client a
400 naming the backend (``tools: error``). Requests without tools are served byte for byte
as before.

The main path runs the official ``openai`` SDK against a real ``archroute serve`` process
whose transformer is an upstream: a real HTTP server (uvicorn, in a thread) serving
``serve-model``'s app over a fake backend with scripted tool calls, which records every body
it receives."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from models import registry
from models.base import ChatMessage, GenerationParams, plain_chat_prompt
from models.fake import FakeBackend, fake_tool_calls
from models.upstream import OpenAIUpstreamBackend, SSEParser
from router.app import create_app
from router.model_server import create_model_app
from router.settings import SettingsError, load_settings
from tests.router.servers import Server, free_port, serve_config

# typed Any: the SDK's TypedDict parameters accept them as the JSON a client sends
TOOLS: Any = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CALLS = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
WHOLE_CALLS = fake_tool_calls(CALLS)  # [{"id": "call_fake_0", "type": "function", ...}]
ASK: Any = [{"role": "system", "content": "You can look up the weather."},
       {"role": "user", "content": "Repeat exactly what the weather tool says for Paris."}]
PROSE: Any = [{"role": "user", "content": "Write a short poem about the sea at dusk."}]
UP_REPLY = "upstream says hi there"


# --- servers ---------------------------------------------------------------------------

class Recording:
    """ASGI wrapper: keeps the JSON body of every POST it passes on (``bodies``)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        parts, more = [], True
        while more:
            msg = await receive()
            parts.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(parts)
        self.bodies.append(json.loads(raw))
        given = False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


@contextmanager
def thread_server(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port in a thread; yields its URL."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


class Upstream:
    """``serve-model``'s app over a fake that calls tools, served for real, recording."""

    def __init__(self, url: str, backend: FakeBackend, recording: Recording) -> None:
        self.url, self.backend, self.recording = url, backend, recording

    def received(self) -> dict:
        """The last chat body the upstream received."""
        return self.recording.bodies[-1]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    fake = FakeBackend("up-fake", default_reply=UP_REPLY, tool_calls=CALLS)
    rec = Recording(create_model_app(fake, "up-fake"))
    with thread_server(rec) as url:
        yield Upstream(url, fake, rec)


@pytest.fixture(scope="module")
def router(upstream: Upstream, tmp_path_factory) -> Iterator[Server]:
    """A real router process: transformer ``t-up`` (the upstream), hybrid ``h-fake`` (a fake
    in-process backend, which cannot call tools); ``tools`` at its default (auto)."""
    tmp = tmp_path_factory.mktemp("tools")
    config = {"backends": {"transformer": {"name": "t-up", "kind": "upstream",
                                           "base_url": upstream.url + "/v1", "model": "up-fake"},
                           "hybrid": {"name": "h-fake", "kind": "fake",
                                      "fake_reply": "from the hybrid"}},
              "decision_log": str(tmp / "decisions.sqlite")}
    s = serve_config(config, tmp)
    yield s
    s.stop()


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def call_dicts(tool_calls) -> list[dict]:
    """The SDK's tool calls as the dicts a client sends back in the next turn."""
    return [{"id": c.id, "type": c.type,
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in tool_calls]


def streamed_calls(chunks) -> dict[int, dict]:
    """Tool-call deltas of a stream merged by index, as a client assembles them."""
    out: dict[int, dict] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            call = out.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            if d.function is not None:
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
    return out


# --- 1. through real servers with the official SDK ---------------------------------------

@pytest.mark.slow
def test_tools_reach_the_upstream_and_its_tool_calls_come_back(router, upstream) -> None:
    raw = sdk(router.url).chat.completions.with_raw_response.create(
        model="t-up", messages=ASK, tools=TOOLS, tool_choice="auto",
        parallel_tool_calls=False, max_tokens=50)
    assert "x-archroute-warning" not in raw.headers
    assert raw.headers["x-archroute-backend"] == "t-up"
    resp = raw.parse()
    got = upstream.received()
    assert got["tools"] == TOOLS and got["tool_choice"] == "auto"
    assert got["parallel_tool_calls"] is False
    assert got["messages"] == ASK
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls: Any = choice.message.tool_calls
    assert call_dicts(calls) == WHOLE_CALLS
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    extra: Any = resp.model_extra
    assert extra["archroute"]["backend"] == "t-up"
    usage: Any = resp.usage
    assert usage.completion_tokens > 0

    # the follow-up turn: the tool's result, tools sent again (as chat apps do)
    history: Any = [*ASK, {"role": "assistant", "content": None,
                           "tool_calls": call_dicts(calls)},
                    {"role": "tool", "tool_call_id": "call_fake_0", "name": "get_weather",
                     "content": '{"city": "Paris", "sky": "clear", "celsius": 21}'}]
    raw = sdk(router.url).chat.completions.with_raw_response.create(
        model="t-up", messages=history, tools=TOOLS, max_tokens=50)
    resp = raw.parse()
    assert upstream.received()["messages"] == history  # tool turns exactly as sent
    assert upstream.received()["tools"] == TOOLS
    assert "tool_choice" not in upstream.received()  # not sent, not invented
    assert resp.choices[0].message.content == UP_REPLY
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].finish_reason == "stop"
    assert "x-archroute-warning" not in raw.headers
    # what the upstream's backend made of it: the tool turns as ChatMessage fields
    prompt = upstream.backend.calls[-1][1]
    assert isinstance(prompt, list)
    assert prompt[2] == ChatMessage("assistant", "", WHOLE_CALLS)
    assert prompt[3] == ChatMessage("tool", history[3]["content"], None, "call_fake_0",
                                    "get_weather")


@pytest.mark.slow
def test_streamed_tool_calls_reach_the_sdk_as_deltas(router, upstream) -> None:
    chunks: Any = list(sdk(router.url).chat.completions.create(
        model="t-up", messages=ASK, tools=TOOLS, stream=True,
        stream_options={"include_usage": True}))
    assert upstream.received()["tools"] == TOOLS and upstream.received()["stream"] is True
    calls = streamed_calls(chunks)
    assert calls == {0: {"id": "call_fake_0", "name": "get_weather",
                         "arguments": WHOLE_CALLS[0]["function"]["arguments"]}}
    # the arguments arrived in pieces, each its own event, index-keyed
    pieces = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert len(pieces) >= 3 and all(d.index == 0 for d in pieces)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert chunks[-1].usage.completion_tokens > 0
    assert {c.model_extra["archroute"]["backend"] for c in chunks} == {"t-up"}


@pytest.mark.slow
def test_a_routed_tool_request_is_passed_on_or_dropped_by_the_backend_chosen(router,
                                                                            upstream) -> None:
    client = sdk(router.url).chat.completions
    # the rules send a copy request to the transformer (the upstream: tools passed on) ...
    raw = client.with_raw_response.create(model="archroute-rules", messages=ASK, tools=TOOLS)
    assert raw.headers["x-archroute-backend"] == "t-up"
    assert raw.parse().choices[0].finish_reason == "tool_calls"
    assert "x-archroute-warning" not in raw.headers
    # ... and prose to the hybrid, in-process, which cannot call tools: served without them
    n = len(upstream.recording.bodies)
    raw = client.with_raw_response.create(model="archroute-rules", tools=TOOLS,
                                          tool_choice="auto", messages=PROSE)
    assert raw.headers["x-archroute-backend"] == "h-fake"
    assert raw.headers["x-archroute-warning"] == "tools, tool_choice ignored: h-fake cannot call tools"
    resp = raw.parse()
    assert resp.choices[0].message.content == "from the hybrid"
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].finish_reason == "stop"
    assert len(upstream.recording.bodies) == n  # the upstream saw nothing of it


@pytest.mark.slow
def test_the_in_process_backend_named_directly_drops_tools_in_a_stream_too(router) -> None:
    with sdk(router.url).chat.completions.with_streaming_response.create(
            model="h-fake", messages=ASK, tools=TOOLS, stream=True) as raw:
        assert raw.headers["x-archroute-warning"] == "tools ignored: h-fake cannot call tools"
        chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "from the hybrid"
    assert streamed_calls(chunks) == {}


# the same request before and after tool calling was added: body, headers and what the
# upstream received (captured from the router of the commit before, ids and times masked)
PLAIN = {"model": "t-up", "max_tokens": 3, "seed": 5, "stop": ["zz"], "temperature": 0.5,
         "messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "hi", "name": "bob"},
                      {"role": "assistant", "content": "hello"},
                      {"role": "tool", "content": "42"},
                      {"role": "user", "content": [{"type": "text", "text": "a"},
                                                   {"type": "text", "text": "b"}]}]}
PLAIN_BODY = (
    '{"id":"X","object":"chat.completion","created":"X","model":"t-up","choices":[{"index":0,'
    '"message":{"role":"assistant","content":"upstream says hi"},"logprobs":null,'
    '"finish_reason":"length"}],"usage":{"prompt_tokens":6,"completion_tokens":3,'
    '"total_tokens":9,"archroute_backend":"t-up"},"archroute":{"profile":null,"policy":null,'
    '"score":null,"threshold":null,"decision":"transformer","backend":"t-up",'
    '"fallback_from":null,"side_request":false,"overhead_ms":"X","propensity":1.0,'
    '"explored":false}}')
PLAIN_UPSTREAM = (
    '{"model":"up-fake","temperature":0.5,"top_p":1.0,"max_tokens":3,"seed":5,"stop":["zz"],'
    '"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},'
    '{"role":"assistant","content":"hello"},{"role":"tool","content":"42"},'
    '{"role":"user","content":"ab"}]}')
PLAIN_STREAM_EVENT = (
    '{"id":"X","object":"chat.completion.chunk","created":"X","model":"t-up","choices":'
    '[{"index":0,"delta":{"content":" says"},"logprobs":null,"finish_reason":null}],'
    '"archroute":{"backend":"t-up"}}')


def masked(text: str) -> str:
    """``text`` (JSON) compact, with ids, times and overheads as "X"; key order kept."""
    def mask(o):
        if isinstance(o, dict):
            return {k: "X" if k in ("id", "created", "overhead_ms") else mask(v)
                    for k, v in o.items()}
        return [mask(x) for x in o] if isinstance(o, list) else o
    return json.dumps(mask(json.loads(text)), separators=(",", ":"))


@pytest.mark.slow
def test_a_request_without_tools_is_served_as_before(router, upstream) -> None:
    r = httpx.post(router.url + "/v1/chat/completions", json=PLAIN, timeout=30)
    assert r.status_code == 200
    assert masked(r.text) == PLAIN_BODY
    assert {k: v for k, v in r.headers.items() if k.startswith("x-archroute")
            and k != "x-archroute-overhead-ms"} == {"x-archroute-backend": "t-up",
                                                    "x-archroute-policy": "direct"}
    assert json.dumps(upstream.received(), separators=(",", ":")) == PLAIN_UPSTREAM
    body = {"model": "t-up", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    r = httpx.post(router.url + "/v1/chat/completions", json=body, timeout=30)
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert masked(events[2]) == PLAIN_STREAM_EVENT and events[-1] == "[DONE]"
    assert "tools" not in upstream.received() and "tool_choice" not in upstream.received()


# --- 2. the settings, on fakes in-process ----------------------------------------------

def fakes(tmp_path: Path, tools: str = "auto", t_calls: list | None = CALLS,
          **overrides: object) -> tuple[FastAPI, FakeBackend, FakeBackend]:
    """A router app: transformer ``t-fake`` (calls tools when ``t_calls``), hybrid
    ``h-fake`` (cannot)."""
    settings = load_settings(overrides={
        "backends": {"transformer": {"name": "t-fake", "kind": "fake"},
                     "hybrid": {"name": "h-fake", "kind": "fake"}},
        "decision_log": str(tmp_path / "d.sqlite"), "tools": tools, **overrides}, environ={})
    t = FakeBackend("t-fake", "transformer", default_reply="from transformer", tool_calls=t_calls)
    h = FakeBackend("h-fake", "hybrid", default_reply="from hybrid")
    return create_app(settings, backends={"transformer": t, "hybrid": h}), t, h


def chat(client: TestClient, model: str, messages=ASK, **kw) -> Any:
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, **kw})


HISTORY: Any = [*ASK, {"role": "assistant", "content": None, "tool_calls": WHOLE_CALLS},
           {"role": "tool", "tool_call_id": "call_fake_0", "content": "sunny, 21 C"}]


def test_auto_drops_tools_for_a_backend_that_cannot_call_them(tmp_path: Path) -> None:
    app, t, h = fakes(tmp_path)
    with TestClient(app) as c:
        r = chat(c, "h-fake", HISTORY, tools=TOOLS, tool_choice="auto")
        assert r.status_code == 200
        assert r.headers["x-archroute-warning"] == "tools, tool_choice ignored: h-fake cannot call tools"
        msg = r.json()["choices"][0]["message"]
        assert msg == {"role": "assistant", "content": "from hybrid"}
        assert h.params[-1].tools is None and h.params[-1].tool_choice is None
        # the in-process backend keeps the tool turns and renders the calls as text
        prompt = h.calls[-1][1]
        assert isinstance(prompt, list)
        assert prompt[2].tool_calls == WHOLE_CALLS and prompt[3].tool_call_id == "call_fake_0"
        text = plain_chat_prompt(prompt)
        assert 'Assistant: [tool call] get_weather({"city": "Paris"})' in text
        assert "Tool: sunny, 21 C" in text
        # the one that can call tools gets them, with the history
        r = chat(c, "t-fake", ASK, tools=TOOLS)
        assert "x-archroute-warning" not in r.headers
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": None,
                                                     "tool_calls": WHOLE_CALLS}
        assert t.params[-1].tools == TOOLS


def test_error_is_a_400_naming_the_backend(tmp_path: Path) -> None:
    app, t, h = fakes(tmp_path, tools="error")
    with TestClient(app) as c:
        for body in ({}, {"stream": True}):
            r = chat(c, "h-fake", tools=TOOLS, **body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["param"] == "tools" and err["type"] == "invalid_request_error"
            assert "backend 'h-fake' cannot call tools" in err["message"]
        assert h.calls == []  # nothing reached it
        r = chat(c, "h-fake", tool_choice="none")  # any tool field counts
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        r = c.post("/v1/completions", json={"model": "t-fake", "prompt": "x", "tools": TOOLS})
        assert r.status_code == 400 and "/v1/completions takes no tools" in r.text
        # a backend that can call tools serves them; no tools: no change
        assert chat(c, "t-fake", tools=TOOLS).json()["choices"][0]["finish_reason"] == "tool_calls"
        r = chat(c, "h-fake")
        assert r.status_code == 200 and "x-archroute-warning" not in r.headers


def test_error_with_the_official_sdk_against_a_real_server(tmp_path: Path) -> None:
    app, _, _ = fakes(tmp_path, tools="error")
    with thread_server(app) as url:
        with pytest.raises(openai.BadRequestError) as info:
            sdk(url).chat.completions.create(model="h-fake", messages=ASK, tools=TOOLS)
    assert info.value.status_code == 400
    body = cast(dict, info.value.body)
    assert body["param"] == "tools"
    assert "backend 'h-fake' cannot call tools" in body["message"]


def test_drop_drops_even_for_a_backend_that_calls_tools(tmp_path: Path) -> None:
    app, t, _ = fakes(tmp_path, tools="drop")
    with TestClient(app) as c:
        r = chat(c, "t-fake", tools=TOOLS, tool_choice="auto")
        assert r.headers["x-archroute-warning"] == ("tools, tool_choice ignored (router setting "
                                                    "tools: drop)")
        assert r.json()["choices"][0]["message"]["content"] == "from transformer"
        assert t.params[-1].tools is None


def test_completions_take_no_tools(tmp_path: Path) -> None:
    app, t, _ = fakes(tmp_path)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": "t-fake", "prompt": "x", "tools": TOOLS})
        assert r.status_code == 200
        assert r.headers["x-archroute-warning"] == "tools ignored: /v1/completions takes no tools"
        assert t.params[-1].tools is None


def test_fallback_follows_the_same_rule(tmp_path: Path) -> None:
    # auto: the transformer (calls tools) fails first; the hybrid serves without them
    app, t, _ = fakes(tmp_path)
    with TestClient(app) as c:
        t.fail(1)
        r = chat(c, "archroute-rules", tools=TOOLS)
        assert r.status_code == 200
        assert r.headers["x-archroute-fallback"].startswith("t-fake;")
        assert r.headers["x-archroute-backend"] == "h-fake"
        assert r.headers["x-archroute-warning"] == "tools ignored: h-fake cannot call tools"
        assert t.params[-1].tools == TOOLS  # the first try had them
    # error: no fallback to a backend that cannot call tools; the failure is the answer
    app, t, h = fakes(tmp_path, tools="error")
    with TestClient(app) as c:
        t.fail(1)
        r = chat(c, "archroute-rules", tools=TOOLS)
        assert r.status_code == 502 and r.json()["error"]["code"] == "backend_failed"
        assert "x-archroute-fallback" not in r.headers and h.calls == []
        t.fail(1)
        r = chat(c, "archroute-rules", stream=True, tools=TOOLS)
        assert r.status_code == 502 and h.calls == []
        # without tools the same failure falls back as always
        t.fail(1)
        r = chat(c, "archroute-rules")
        assert r.status_code == 200 and r.headers["x-archroute-backend"] == "h-fake"


def test_streamed_tool_calls_in_process(tmp_path: Path) -> None:
    app, _, _ = fakes(tmp_path)
    with TestClient(app) as c:
        r = chat(c, "t-fake", tools=TOOLS, stream=True, stream_options={"include_usage": True})
    events = [json.loads(ln[6:]) for ln in r.text.splitlines()
              if ln.startswith("data: ") and ln != "data: [DONE]"]
    deltas = [e["choices"][0]["delta"]["tool_calls"] for e in events
              if e["choices"] and "tool_calls" in e["choices"][0]["delta"]]
    assert deltas[0] == [{"index": 0, "id": "call_fake_0", "type": "function",
                          "function": {"name": "get_weather", "arguments": ""}}]
    args = "".join(d[0]["function"]["arguments"] for d in deltas)
    assert args == WHOLE_CALLS[0]["function"]["arguments"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "tool_calls"
    assert events[-1]["usage"]["completion_tokens"] > 0


def test_legacy_functions_are_mapped_to_tools(tmp_path: Path) -> None:
    app, t, _ = fakes(tmp_path)
    fn = TOOLS[0]["function"]
    with TestClient(app) as c:
        r = chat(c, "t-fake", functions=[fn], function_call={"name": "get_weather"})
        assert r.status_code == 200
        assert t.params[-1].tools == [{"type": "function", "function": fn}]
        assert t.params[-1].tool_choice == {"type": "function",
                                            "function": {"name": "get_weather"}}
        assert r.json()["choices"][0]["message"]["tool_calls"] == WHOLE_CALLS
        chat(c, "t-fake", functions=[fn], function_call="none")
        assert t.params[-1].tool_choice == "none"
        r = chat(c, "t-fake", functions=[fn], tools=TOOLS)
        assert r.status_code == 400 and r.json()["error"]["param"] == "functions"
        r = chat(c, "t-fake", tools=TOOLS, tool_choice="auto", function_call="auto")
        assert r.status_code == 400 and r.json()["error"]["param"] == "function_call"
        r = chat(c, "h-fake", functions=[fn])
        assert r.headers["x-archroute-warning"] == "functions ignored: h-fake cannot call tools"


@pytest.mark.parametrize("calls", [[{"function": "get_weather"}], [{"id": "x"}],
                                   [{"function": {"name": 3}}],
                                   [{"function": {"name": "f", "arguments": 5}}],
                                   [{"function": {"name": "f", "arguments": "\ud800"}}]])
def test_malformed_tool_calls_in_the_history_are_400(tmp_path: Path, calls) -> None:
    app, t, h = fakes(tmp_path)
    body = json.dumps({"model": "h-fake", "messages": [
        *ASK, {"role": "assistant", "content": None, "tool_calls": calls}]})
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert h.calls == []


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "description": "\ud800"}}]),
    ("functions", [{"name": "f\udfff"}]), ("tool_choice", {"\ud800": 1})])
def test_unpaired_surrogates_in_tool_fields_are_400(tmp_path: Path, field: str, value) -> None:
    app, t, _ = fakes(tmp_path)
    body = json.dumps({"model": "t-fake", "messages": ASK, field: value})
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
    assert t.calls == []


def test_no_tools_no_tool_fields_anywhere(tmp_path: Path) -> None:
    app, t, _ = fakes(tmp_path)
    with TestClient(app) as c:
        r = chat(c, "t-fake", tools=[])  # an empty list is no tools
        assert r.status_code == 200 and "x-archroute-warning" not in r.headers
        assert r.json()["choices"][0]["message"] == {"role": "assistant",
                                                     "content": "from transformer"}
        assert t.params[-1] == GenerationParams(max_tokens=None)


def test_settings() -> None:
    assert load_settings(environ={}).tools == "auto"
    with pytest.raises(SettingsError, match="kind 'hf' cannot call tools"):
        load_settings(overrides={"backends": {"transformer": {"name": "t", "path": "x",
                                                              "call_tools": True},
                                              "hybrid": {"name": "h", "path": "y"}}},
                      environ={})
    with pytest.raises(SettingsError, match="tools"):
        load_settings(overrides={"tools": "maybe"}, environ={})
    # an upstream that takes no tools (vLLM without --enable-auto-tool-choice)
    s = load_settings(overrides={"backends": {
        "transformer": {"name": "t", "kind": "upstream", "base_url": "http://x/v1",
                        "model": "m", "call_tools": False},
        "hybrid": {"name": "h", "kind": "upstream", "base_url": "http://y/v1", "model": "m"}}},
        environ={})
    assert not registry.build(s.backends["transformer"], "transformer").can_call_tools
    assert registry.build(s.backends["hybrid"], "hybrid").can_call_tools
    fake = {"name": "f", "kind": "fake", "fake_tool_calls": CALLS}
    s = load_settings(overrides={"backends": {"transformer": fake, "hybrid": {
        **fake, "name": "g", "call_tools": False}}}, environ={})
    assert registry.build(s.backends["transformer"]).can_call_tools
    assert not registry.build(s.backends["hybrid"]).can_call_tools


# --- 3. the upstream backend against `serve-model fake --fake-tool-calls` -----------------

@pytest.fixture(scope="module")
def model_server() -> Iterator[Server]:
    s = Server(["serve-model", "fake", "--name", "tm", "--fake-reply", "plain text",
                "--fake-tool-calls", json.dumps(CALLS)]).wait_ready()
    yield s
    s.stop()


@pytest.mark.slow
def test_upstream_backend_with_a_serve_model_that_calls_tools(model_server: Server) -> None:
    b = OpenAIUpstreamBackend("up", model_server.url + "/v1", "tm", timeout=10)
    assert b.can_call_tools
    asked = [ChatMessage("user", "weather?")]
    r = b.generate(asked, GenerationParams(tools=TOOLS))
    assert (r.text, r.finish_reason, r.tool_calls) == ("", "tool_calls", WHOLE_CALLS)
    r = b.generate(asked, GenerationParams(tools=TOOLS, tool_choice="none"))
    assert (r.text, r.finish_reason, r.tool_calls) == ("plain text", "stop", None)
    r = b.generate(asked, GenerationParams())  # no tools: no tool calls read or made
    assert (r.text, r.tool_calls) == ("plain text", None)

    async def stream(params: GenerationParams) -> list:
        out = [c async for c in b.astream(asked, params)]
        await b.aclose()
        return out

    chunks = asyncio.run(stream(GenerationParams(tools=TOOLS)))
    deltas = [c.tool_calls for c in chunks if c.tool_calls]
    assert deltas[0] == [{"index": 0, "id": "call_fake_0", "type": "function",
                          "function": {"name": "get_weather", "arguments": ""}}]
    assert "".join(d[0]["function"]["arguments"] for d in deltas[1:]) == \
        WHOLE_CALLS[0]["function"]["arguments"]
    assert chunks[-1].finish_reason == "tool_calls" and chunks[-1].completion_tokens
    # the sync stream, and the history going back
    history = [*asked, ChatMessage("assistant", "", copy.deepcopy(WHOLE_CALLS)),
               ChatMessage("tool", "sunny", tool_call_id="call_fake_0")]
    chunks = list(b.stream(history, GenerationParams(tools=TOOLS)))
    assert "".join(c.text for c in chunks) == "plain text"
    assert chunks[-1].finish_reason == "stop"
    b.close()
    off = OpenAIUpstreamBackend("up", model_server.url + "/v1", "tm", call_tools=False)
    assert not off.can_call_tools


def test_sse_parser_reads_tool_calls_only_when_tools_were_sent() -> None:
    line = "data: " + json.dumps({"choices": [{"index": 0, "delta": {
        "content": "Let me look.", "tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                   "function": {"name": "f", "arguments": ""}}]},
        "finish_reason": None}]})
    with_tools = SSEParser("up", chat=True, tools=True).feed(line)
    assert [c.text for c in with_tools] == ["Let me look.", ""]
    assert with_tools[1].tool_calls == [{"index": 0, "id": "c1", "type": "function",
                                         "function": {"name": "f", "arguments": ""}}]
    assert [c.tool_calls for c in SSEParser("up", chat=True).feed(line)] == [None]
    p = SSEParser("up", chat=True, tools=True)
    p.feed('data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}')
    assert p.final().finish_reason == "tool_calls"


def test_plain_rendering_of_tool_calls() -> None:
    m = ChatMessage("assistant", "Checking.", [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": '{"a": 1}'}}, {"function": {"name": "g",
                                                              "arguments": {"b": 2}}}])
    assert m.plain() == 'Checking.\n[tool call] f({"a": 1})\n[tool call] g({"b": 2})'
    assert ChatMessage("user", "hi").plain() == "hi"
    assert hash(m) == hash(ChatMessage("assistant", "Checking.", []))  # still hashable
    assert re.search(r"Assistant: Checking\.\n\[tool call\] f", plain_chat_prompt([m]))
