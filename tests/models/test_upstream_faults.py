"""Misbehaving upstreams on real loopback sockets, through the real router and through the
backend itself (issue #21: N1, N5, N7, N9).

``FaultUpstream`` is a raw asyncio server (its own thread and loop) that speaks just enough
HTTP/1.1 to be an OpenAI chat upstream: it answers a chat with ``echo: <last user message>``
and misbehaves as the message asks (``fault=NAME`` in the message, or ``always`` for every
request). It counts every request it reads by its message, so a test can assert that
nothing was sent twice, and every connection it accepts.

What must hold for each fault: the client gets its own answer or a clean 502/504 in the
OpenAI error envelope (never another user's answer), the next request on the same backend
is served normally, and no request reaches the upstream twice.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from models.base import BackendError, ChatMessage, GenerationParams
from models.upstream import (
    OpenAIUpstreamBackend,
    ResponseTooLargeError,
    UpstreamTimeoutError,
)
from tests.router.servers import Server, free_port, serve_config

LIMIT = 65536  # the router's max_response_bytes for the upstream in these tests
TIMEOUT_S = 3.0  # the upstream backend's timeout_s
FAULT = re.compile(r"fault=(\S+)")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def answer_json(text: str) -> bytes:
    return json.dumps({
        "id": "c1", "object": "chat.completion", "created": 0, "model": "m1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()


def ok(text: str, extra_head: bytes = b"") -> bytes:
    body = answer_json(text)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra_head
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def sse_events(text: str, finish: str | None = "stop", done: bool = True) -> list[bytes]:
    """The chat stream of ``text`` in three pieces, each event one chunk."""
    third = max(1, len(text) // 3)
    pieces = [text[:third], text[third:2 * third], text[2 * third:]]
    out = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        ev = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m1",
              "choices": [{"index": 0, "delta": {"content": piece},
                           "finish_reason": finish if last else None}]}
        out.append(b"data: " + json.dumps(ev).encode() + b"\n\n")
    if done:
        out.append(b"data: [DONE]\n\n")
    return out


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


def ok_stream(text: str, finish: str | None = "stop", done: bool = True) -> bytes:
    return STREAM_HEAD + b"".join(_chunk(e) for e in sse_events(text, finish, done)) + b"0\r\n\r\n"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed upstream does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultUpstream:
    """See the module docstring. ``url`` is its ``/v1`` base URL; :meth:`restart` closes
    every connection and listens again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.received: Counter[str] = Counter()
        self.connections = 0
        self.always: str | None = None
        self.pushing = False  # a `stray_later` answer is pushing its extra response
        self.pushed = threading.Event()  # ... and has pushed it
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._start())

    def _call(self, coro):  # run on the server's loop, wait for the result
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                  reuse_address=True)

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    def restart(self) -> None:
        self._call(self._stop())
        self._call(self._start())

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        self._call(self._stop())
        self._call(self._cancel_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def count(self, content: str) -> int:
        return self.received[content]

    def settle(self) -> None:
        """After ``stray_later``: wait until the unsolicited response is out and the client
        has had time to read it into its idle pooled connection. (Pushed *after* the next
        request was written, it would be that request's answer for any HTTP/1.1 client:
        nothing tells the two apart; what a client must not do is hand a connection that
        received bytes while idle to a new request.)"""
        if self.pushing:
            assert self.pushed.wait(5)
            self.pushing = False
            self.pushed.clear()
            time.sleep(0.1)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = json.loads(await reader.readexactly(int(m.group(1)) if m else 0))
                content = body["messages"][-1]["content"]
                self.received[content] += 1
                fault = self.always or (f.group(1) if (f := FAULT.search(content)) else "none")
                keep = await self._answer(fault, f"echo: {content}", bool(body.get("stream")),
                                          writer)
                if not keep:
                    return
        except (ConnectionError, OSError):
            return
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    async def _answer(self, fault: str, text: str, stream: bool,
                      writer: asyncio.StreamWriter) -> bool:
        """Write the answer for ``fault``; False: the connection is done."""
        normal = ok_stream(text) if stream else ok(text)
        other = "echo: user mallory (another user's answer)"
        if fault == "none":
            writer.write(normal)
        elif fault == "continue100":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + normal)
        elif fault == "hints103":
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                         + normal)
        elif fault == "stray5":
            writer.write(normal + b"XXXXX")
        elif fault == "stray_response":  # a whole second response after the body
            writer.write(normal + ok(other))
        elif fault == "stray_later":  # a whole response pushed onto the idle connection
            self.pushing = True
            writer.write(normal)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(ok(other))
            await writer.drain()
            self.pushed.set()
        elif fault in ("204body", "304body"):
            body = answer_json(other)
            status = b"204 No Content" if fault == "204body" else b"304 Not Modified"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
        elif fault in ("neglen", "badlen"):
            body = answer_json(text)
            length = b"-5" if fault == "neglen" else b"12abc"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + length + b"\r\n\r\n" + body + ok(other))
        elif fault == "chunk_overflow":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         b"fffffffffffffffffffffffffffffffff\r\n" + answer_json(text) + b"\r\n")
        elif fault == "reset_body":
            body = answer_json(text)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (len(body) + 100) + body[:20])
            await writer.drain()
            await asyncio.sleep(0.05)
            _reset(writer)
            return False
        elif fault == "reset_stream":
            events = sse_events(text)
            writer.write(STREAM_HEAD + _chunk(events[0]))
            await writer.drain()
            await asyncio.sleep(0.05)
            _reset(writer)
            return False
        elif fault == "nodone":  # finish reason sent, no [DONE]; the body ends properly
            writer.write(ok_stream(text, "length", done=False) if stream else normal)
        elif fault == "nodone_nofinish":
            writer.write(ok_stream(text, None, done=False) if stream else normal)
        elif fault == "nodone_close":  # no length, no chunking: the body ends at the close
            body = b"".join(sse_events(text, "stop", done=False))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Connection: close\r\n\r\n" + body)
            await writer.drain()
            return False
        elif fault == "big":
            writer.write(ok(text + " " + "x" * (2 * LIMIT)))
        elif fault == "big_chunked":
            body = answer_json(text + " " + "x" * (2 * LIMIT))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         + b"".join(_chunk(body[i:i + 4096]) for i in range(0, len(body), 4096))
                         + b"0\r\n\r\n")
        elif fault == "big_stream":
            pad = "y" * 1000
            events = [e for _ in range(2 * LIMIT // 1000) for e in sse_events(pad, None, False)]
            writer.write(STREAM_HEAD + b"".join(_chunk(e) for e in events)
                         + b"".join(_chunk(e) for e in sse_events(text)) + b"0\r\n\r\n")
        elif fault == "trickle":  # one byte at a time, never the whole body in time
            body = answer_json(text)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            for i in range(min(len(body), int(4 * TIMEOUT_S / 0.2))):
                writer.write(body[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0.2)
            return False
        elif fault == "silent":
            await asyncio.sleep(3 * TIMEOUT_S)
            return False
        elif fault == "close_early":  # reads the request, closes before any byte
            return False
        else:
            raise AssertionError(f"unknown fault {fault}")
        await writer.drain()
        return True


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultUpstream]:
    up = FaultUpstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def router(upstream: FaultUpstream, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("faults")
    config = {
        "backends": {
            "transformer": {"name": "m1", "kind": "upstream", "base_url": upstream.url,
                            "model": "m1", "timeout_s": TIMEOUT_S,
                            "max_response_bytes": LIMIT},
            "hybrid": {"name": "fake-hybrid", "kind": "fake"}},
        "fallback": False,
        "failure_threshold": 1000,  # every fault here is one failure: keep the breaker shut
        "decision_log": "",
    }
    srv = serve_config(config, tmp)
    yield srv
    srv.stop()


def sdk(router: Server) -> openai.OpenAI:
    # max_retries=0: the SDK itself would resend a request after a 502 (that is not the
    # router's resend, and would hide one)
    return openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0,
                         timeout=30)


def chat(router: Server, content: str) -> tuple[int, dict]:
    """Status and JSON body of one non-streamed chat (with httpx: the error body too)."""
    r = httpx.post(router.url + "/v1/chat/completions", timeout=30,
                   json={"model": "m1", "messages": [{"role": "user", "content": content}]})
    return r.status_code, r.json()


def assert_clean_error(status: int, body: dict, statuses: tuple[int, ...] = (502,)) -> None:
    assert status in statuses, (status, body)
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "code"}
    assert body["error"]["type"] == "upstream_error"


def assert_own_answer(router: Server, upstream: FaultUpstream, content: str) -> None:
    r = sdk(router).chat.completions.create(model="m1",
                                            messages=[{"role": "user", "content": content}])
    assert r.choices[0].message.content == f"echo: {content}"
    assert upstream.count(content) == 1


def failures(router: Server) -> float:
    text = httpx.get(router.url + "/metrics", timeout=10).text
    m = re.search(r'^archroute_backend_failures_total\{backend="m1"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


# --- N1: the repro, through `archroute serve --transformer URL#m1 --hybrid fake` --
@pytest.mark.slow
def test_repro_100_continue_users_get_their_own_answers(upstream: FaultUpstream) -> None:
    """Every upstream answer starts with `100 Continue`: alice, bob, carol and dave each get
    their own answer (before: bob got alice's, dave got bob's)."""
    srv = Server(["serve", "--transformer", f"{upstream.url}#m1", "--hybrid", "fake",
                  "--decision-log", ""]).wait_ready()
    upstream.always = "continue100"
    try:
        c = sdk(srv)
        users = ("alice", "bob", "carol", "dave")
        got: dict[str, str] = {}
        for user in users:
            try:
                got[user] = c.chat.completions.create(
                    model="m1", messages=[{"role": "user", "content": f"user {user}"}]
                ).choices[0].message.content or ""
            except openai.APIStatusError as exc:
                got[user] = f"HTTP {exc.status_code}"
        assert got == {u: f"echo: user {u}" for u in users}
        assert [upstream.count(f"user {u}") for u in users] == [1, 1, 1, 1]
    finally:
        upstream.always = None
        srv.stop()


# --- N1: interim responses and bytes the response does not own ---------------------------
@pytest.mark.parametrize("fault", ["continue100", "hints103"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_interim_responses_are_skipped(router: Server, upstream: FaultUpstream, fault: str,
                                       stream: bool) -> None:
    c = sdk(router)
    for user in ("alice", "bob", "carol"):
        content = f"user {user} fault={fault} stream={stream}"
        msgs = [{"role": "user", "content": content}]
        if stream:
            text = "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(model="m1", messages=msgs, stream=True)
                           if ch.choices)
        else:
            text = c.chat.completions.create(model="m1", messages=msgs).choices[0].message.content
        assert text == f"echo: {content}"
        assert upstream.count(content) == 1


@pytest.mark.parametrize("fault", ["stray5", "stray_response", "stray_later", "204body",
                                   "304body", "neglen", "badlen", "chunk_overflow"])
def test_bytes_after_a_response_never_reach_the_next_request(
        router: Server, upstream: FaultUpstream, fault: str) -> None:
    """The faulty response's client gets its answer or a 502; the next users get theirs
    (the stray bytes include a whole answer for another user)."""
    content = f"user alice fault={fault}"
    status, body = chat(router, content)
    if status == 200:
        assert body["choices"][0]["message"]["content"] == f"echo: {content}"
    else:
        assert_clean_error(status, body)
    assert upstream.count(content) == 1
    upstream.settle()
    for user in ("bob", "carol"):
        assert_own_answer(router, upstream, f"user {user} after {fault}")


# --- broken bodies ---------------------------------------------------------------------
def test_reset_mid_body_is_a_502(router: Server, upstream: FaultUpstream) -> None:
    content = "user alice fault=reset_body"
    assert_clean_error(*chat(router, content))
    assert upstream.count(content) == 1
    assert_own_answer(router, upstream, "user bob after reset_body")


def test_reset_mid_stream_is_an_error_event(router: Server, upstream: FaultUpstream) -> None:
    content = "user alice fault=reset_stream"
    before = failures(router)
    with httpx.stream("POST", router.url + "/v1/chat/completions", timeout=30,
                      json={"model": "m1", "stream": True,
                            "messages": [{"role": "user", "content": content}]}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    errors = [json.loads(e)["error"] for e in events[:-1] if "error" in json.loads(e)]
    assert len(errors) == 1 and errors[0]["type"] == "upstream_error"
    assert failures(router) == before + 1  # a broken stream is a backend failure
    assert upstream.count(content) == 1
    assert_own_answer(router, upstream, "user bob after reset_stream")


# --- N9: a stream without its final marker ------------------------------------------------
@pytest.mark.parametrize("fault,finish", [("nodone", "length"), ("nodone_nofinish", "stop"),
                                          ("nodone_close", "stop")])
def test_stream_without_done_ends_cleanly(router: Server, upstream: FaultUpstream,
                                          fault: str, finish: str) -> None:
    content = f"user alice fault={fault}"
    before = failures(router)
    t0 = time.monotonic()
    chunks = list(sdk(router).chat.completions.create(
        model="m1", messages=[{"role": "user", "content": content}], stream=True))
    took = time.monotonic() - t0
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks
                   if ch.choices) == f"echo: {content}"
    assert chunks[-1].choices[0].finish_reason == finish
    assert took < 0.6 * TIMEOUT_S, took  # no wait for a marker that never comes
    assert failures(router) == before  # not a backend failure
    assert upstream.count(content) == 1
    assert_own_answer(router, upstream, f"user bob after {fault}")


# --- N5: the response size limit ------------------------------------------------------
@pytest.mark.parametrize("fault", ["big", "big_chunked"])
def test_oversized_body_is_a_502(router: Server, upstream: FaultUpstream, fault: str) -> None:
    content = f"user alice fault={fault}"
    assert_clean_error(*chat(router, content))
    assert upstream.count(content) == 1
    assert_own_answer(router, upstream, f"user bob after {fault}")


def test_oversized_stream_is_a_502_or_an_error_event(router: Server,
                                                     upstream: FaultUpstream) -> None:
    """Over the limit before the first chunk: a 502; after it: an error event, then
    ``[DONE]``."""
    content = "user alice fault=big_stream"
    with httpx.stream("POST", router.url + "/v1/chat/completions", timeout=30,
                      json={"model": "m1", "stream": True,
                            "messages": [{"role": "user", "content": content}]}) as r:
        lines = list(r.iter_lines())
    if r.status_code == 200:
        events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert any("error" in json.loads(e) for e in events[:-1])
    else:
        assert_clean_error(r.status_code, json.loads("".join(lines)))
    assert upstream.count(content) == 1
    assert_own_answer(router, upstream, "user bob after big_stream")


# --- timeouts ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["trickle", "silent"])
def test_slow_upstream_is_a_504(router: Server, upstream: FaultUpstream, fault: str) -> None:
    content = f"user alice fault={fault}"
    t0 = time.monotonic()
    assert_clean_error(*chat(router, content), statuses=(504,))
    assert time.monotonic() - t0 < 3 * TIMEOUT_S
    assert upstream.count(content) == 1
    assert_own_answer(router, upstream, f"user bob after {fault}")


# --- N7: never sent twice -----------------------------------------------------------------
def test_reused_connection_closed_before_any_byte_is_not_resent(
        router: Server, upstream: FaultUpstream) -> None:
    """The first request leaves a kept-alive connection; the upstream reads the second on
    it and closes without answering. The upstream may have run it: a 502, never a resend."""
    assert_own_answer(router, upstream, "user alice before close_early")
    content = "user bob fault=close_early"
    assert_clean_error(*chat(router, content))
    assert upstream.count(content) == 1
    assert_own_answer(router, upstream, "user carol after close_early")


def test_upstream_restart_between_keepalive_requests(router: Server,
                                                     upstream: FaultUpstream) -> None:
    assert_own_answer(router, upstream, "user alice before restart")
    upstream.restart()  # every kept-alive connection closed; a new listener, same port
    time.sleep(0.1)
    assert_own_answer(router, upstream, "user bob after restart")
    assert_own_answer(router, upstream, "user carol after restart")


def test_keepalive_connections_are_reused(router: Server, upstream: FaultUpstream) -> None:
    before = upstream.connections
    for i in range(5):
        assert_own_answer(router, upstream, f"user {i} keep-alive")
    assert upstream.connections - before <= 1


# --- the backend itself: both transports (aiohttp on the loop, httpx for the CLI) -------
@pytest.fixture()
def backend(upstream: FaultUpstream) -> Iterator[OpenAIUpstreamBackend]:
    b = OpenAIUpstreamBackend("m1", upstream.url, "m1", timeout=1.0, max_response_bytes=LIMIT)
    yield b
    b.close()


def _run_async(b: OpenAIUpstreamBackend, contents: list[str], stream: bool,
               settle=lambda: None) -> list[object]:
    """Each content's answer text, or the exception it raised, over one event loop;
    ``settle()`` after each (off the loop, so the client reads meanwhile)."""
    async def main() -> list[object]:
        out: list[object] = []
        for i, content in enumerate(contents):
            if i:
                await asyncio.to_thread(settle)
            prompt = [ChatMessage("user", content)]
            try:
                if stream:
                    out.append("".join([c.text async for c in b.astream(prompt,
                                                                        GenerationParams())]))
                else:
                    out.append((await b.agenerate(prompt, GenerationParams())).text)
            except BackendError as exc:
                out.append(exc)
        await b.aclose()
        return out

    return asyncio.run(main())


def _run_sync(b: OpenAIUpstreamBackend, contents: list[str], stream: bool,
              settle=lambda: None) -> list[object]:
    out: list[object] = []
    for i, content in enumerate(contents):
        if i:
            settle()
        prompt = [ChatMessage("user", content)]
        try:
            if stream:
                out.append("".join(c.text for c in b.stream(prompt, GenerationParams())))
            else:
                out.append(b.generate(prompt, GenerationParams()).text)
        except BackendError as exc:
            out.append(exc)
    return out


BACKEND_FAULTS = ["continue100", "hints103", "stray5", "stray_response", "stray_later",
                  "204body", "neglen", "chunk_overflow", "reset_body", "close_early",
                  "big", "big_chunked", "nodone_close"]


@pytest.mark.parametrize("run", [_run_async, _run_sync], ids=["async", "sync"])
@pytest.mark.parametrize("fault", BACKEND_FAULTS)
def test_backend_faults(backend: OpenAIUpstreamBackend, upstream: FaultUpstream, run,
                        fault: str) -> None:
    """Before and after each fault, on one client: every answer is the request's own or a
    BackendError; each request reached the upstream once."""
    tag = f"{run.__name__} {fault}"
    contents = [f"user alice before {tag}", f"user bob fault={fault} {tag}",
                f"user carol after {tag}", f"user dave after {tag}"]
    stream = fault == "nodone_close"
    got = run(backend, contents, stream, upstream.settle)
    assert got[0] == f"echo: {contents[0]}"
    assert got[1] == f"echo: {contents[1]}" or isinstance(got[1], BackendError), got[1]
    assert got[2:] == [f"echo: {c}" for c in contents[2:]]
    assert [upstream.count(c) for c in contents] == [1, 1, 1, 1]
    if fault.startswith("big"):
        assert isinstance(got[1], ResponseTooLargeError)


@pytest.mark.parametrize("run", [_run_async, _run_sync], ids=["async", "sync"])
def test_backend_timeout_on_trickle(backend: OpenAIUpstreamBackend, upstream: FaultUpstream,
                                    run) -> None:
    t0 = time.monotonic()
    got = run(backend, [f"user alice fault=trickle {run.__name__}"], False)
    assert isinstance(got[0], UpstreamTimeoutError)
    assert time.monotonic() - t0 < 3 * backend.timeout


def test_settings_limit_reaches_the_backend(tmp_path: Path) -> None:
    from models.registry import DEFAULT_MAX_RESPONSE_BYTES, build
    from router.settings import load_settings

    s = load_settings(overrides={"backends": {
        "transformer": {"name": "u", "kind": "upstream", "base_url": "http://127.0.0.1:9/v1",
                        "model": "m", "max_response_bytes": 4096},
        "hybrid": {"name": "f", "kind": "fake"}}}, environ={})
    assert build(s.backends["transformer"]).max_response_bytes == 4096  # type: ignore[attr-defined]
    assert s.backends["hybrid"].max_response_bytes == DEFAULT_MAX_RESPONSE_BYTES
