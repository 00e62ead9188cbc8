"""OpenAIUpstreamBackend against real OpenAI-compatible server processes (serve-model)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from models.base import BackendError, ChatMessage, GenerationParams
from models.fake import fake_logprob, fake_tokens
from models.upstream import (
    OpenAIUpstreamBackend,
    SSEParser,
    UpstreamRequestError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    select_continuation,
)
from tests.router.servers import Server, reference_available

REPLY = "Hello from the fake upstream, twice: hello hello."


@pytest.fixture(scope="module")
def fake_server():
    srv = Server(["serve-model", "fake", "--name", "up-fake", "--fake-reply", REPLY]).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture()
def backend(fake_server: Server):
    b = OpenAIUpstreamBackend("up", fake_server.url + "/v1", "up-fake", timeout=10)
    yield b
    b.close()


def test_generate_completion_and_chat(backend: OpenAIUpstreamBackend) -> None:
    r = backend.generate("Say hello", GenerationParams(max_tokens=50))
    assert r.text == REPLY and r.finish_reason == "stop"
    assert r.prompt_tokens == 2 and r.completion_tokens == len(fake_tokens(REPLY))
    r = backend.generate([ChatMessage("user", "hi")], GenerationParams(max_tokens=3))
    assert r.text == "".join(fake_tokens(REPLY)[:3]) and r.finish_reason == "length"


def test_stream(backend: OpenAIUpstreamBackend) -> None:
    for prompt in ("Say hello", [ChatMessage("user", "hi")]):
        chunks = list(backend.stream(prompt, GenerationParams(max_tokens=50)))
        assert "".join(c.text for c in chunks) == REPLY
        assert len(chunks) > 2
        last = chunks[-1]
        assert last.finish_reason == "stop" and last.completion_tokens == len(fake_tokens(REPLY))


def test_score_cuts_the_continuation(backend: OpenAIUpstreamBackend) -> None:
    res = backend.score("The cat sat", " on the mat.")
    assert res.tokens == [" on", " the", " mat."]
    assert res.logprobs == pytest.approx([fake_logprob(t) for t in res.tokens])
    with pytest.raises(BackendError, match="first"):
        backend.score("", "whole text")  # the first token has no log-probability


def test_async_methods(backend: OpenAIUpstreamBackend) -> None:
    async def main() -> None:
        r = await backend.agenerate("Say hello", GenerationParams(max_tokens=50))
        assert r.text == REPLY
        text = "".join([c.text async for c in backend.astream([ChatMessage("user", "x")],
                                                               GenerationParams())])
        assert text == REPLY
        res = await backend.ascore("The cat sat", " on the mat.")
        assert res.tokens == [" on", " the", " mat."]
        await backend.aclose()

    asyncio.run(main())


def test_http_errors_are_backend_errors(fake_server: Server) -> None:
    wrong = OpenAIUpstreamBackend("up", fake_server.url + "/v1", "no-such-model")
    with pytest.raises(UpstreamStatusError) as info:
        wrong.generate("x", GenerationParams())
    assert info.value.status_code == 404 and "no-such-model" in str(info.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = OpenAIUpstreamBackend("down", f"http://127.0.0.1:{port}/v1", "m", connect_timeout=1)
    with pytest.raises(BackendError, match="unreachable"):
        down.generate("x", GenerationParams())
    with pytest.raises(BackendError):
        list(down.stream("x", GenerationParams()))


def test_timeout() -> None:
    """A server that accepts and never answers: the call times out as a BackendError."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        b = OpenAIUpstreamBackend("slow", f"http://127.0.0.1:{sock.getsockname()[1]}/v1", "m",
                                  timeout=0.3)
        with pytest.raises(UpstreamTimeoutError):
            b.generate("x", GenerationParams())
        assert isinstance(UpstreamTimeoutError("x"), TimeoutError)
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        sock.close()


def test_select_continuation_offsets() -> None:
    # "ab|cd" tokenized jointly as "a", "bc", "d": "bc" straddles the boundary and counts
    res = select_continuation("abcdX", 2, 4, ["a", "bc", "d", "X"], [None, -1.0, -2.0, -3.0],
                              [0, 1, 3, 4])
    assert res.tokens == ["bc", "d"] and res.logprobs == [-1.0, -2.0]


def test_sse_parser_error_event() -> None:
    p = SSEParser("u", chat=True)
    assert p.feed(": keep-alive") == []
    assert p.feed('data: {"choices": [{"delta": {"content": "hi"}, "finish_reason": null}]}')[0].text == "hi"
    with pytest.raises(BackendError, match="boom"):
        p.feed('data: {"error": {"message": "boom"}}')


@pytest.mark.slow
@pytest.mark.skipif(not reference_available(), reason="embedded reference pair not built yet")
def test_score_matches_in_process_reference(reference_pair) -> None:
    """Scoring through a serve-model process equals scoring in-process."""
    srv = Server(["serve-model", "reference:transformer", "--name", "ref-t",
                  "--torch-threads", "1"]).wait_ready()
    try:
        up = OpenAIUpstreamBackend("up", srv.url + "/v1", "ref-t", timeout=60)
        prompt, cont = "def add(a, b):\n    return", " a + b\n"
        remote = up.score(prompt, cont)
        local = reference_pair[0].score(prompt, cont)
        assert "".join(remote.tokens) == cont
        assert remote.logprobs == pytest.approx(local.logprobs, abs=1e-3)
        r = up.generate("The", GenerationParams(max_tokens=5, temperature=0))
        assert r.completion_tokens <= 5
        text = "".join(c.text for c in up.stream([ChatMessage("user", "Hi")],
                                                  GenerationParams(max_tokens=5, temperature=0)))
        assert isinstance(text, str)
    finally:
        srv.stop()


def test_request_errors_are_value_errors(fake_server: Server) -> None:
    """An upstream 400 is the request's fault: a ValueError, so the router does not fall back."""
    b = OpenAIUpstreamBackend("up", fake_server.url + "/v1", "up-fake")
    with pytest.raises(UpstreamRequestError) as info:
        b.generate("x", GenerationParams(max_tokens=5, stop=["a", "b", "c", "d", "e"]))
    assert info.value.status_code == 400 and isinstance(info.value, ValueError)


# --- async counterparts (aiohttp under the async methods) ---------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_agenerate_unreachable() -> None:
    async def main() -> None:
        down = OpenAIUpstreamBackend("down", f"http://127.0.0.1:{closed_port()}/v1", "m",
                                     connect_timeout=1)
        with pytest.raises(BackendError, match="unreachable"):
            await down.agenerate("x", GenerationParams())
        with pytest.raises(BackendError, match="unreachable"):
            [c async for c in down.astream("x", GenerationParams())]
        await down.aclose()

    asyncio.run(main())


def test_agenerate_timeout() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):
            pass
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        b = OpenAIUpstreamBackend("slow", f"http://127.0.0.1:{port}/v1", "m", timeout=0.3)
        try:
            with pytest.raises(UpstreamTimeoutError):
                await b.agenerate("x", GenerationParams())
            with pytest.raises(UpstreamTimeoutError):
                [c async for c in b.astream("x", GenerationParams())]
        finally:
            await b.aclose()
            server.close()
            await asyncio.sleep(0.05)  # the handlers see the client's close and end
            await server.wait_closed()

    asyncio.run(main())


def test_agenerate_http_404_is_status_error(fake_server: Server) -> None:
    async def main() -> None:
        wrong = OpenAIUpstreamBackend("up", fake_server.url + "/v1", "no-such-model")
        with pytest.raises(UpstreamStatusError) as info:
            await wrong.agenerate("x", GenerationParams())
        assert info.value.status_code == 404 and "no-such-model" in str(info.value)
        assert not isinstance(info.value, UpstreamRequestError)
        with pytest.raises(UpstreamStatusError) as info:
            [c async for c in wrong.astream("x", GenerationParams())]
        assert info.value.status_code == 404
        await wrong.aclose()

    asyncio.run(main())


def test_agenerate_http_400_is_request_error(fake_server: Server) -> None:
    async def main() -> None:
        b = OpenAIUpstreamBackend("up", fake_server.url + "/v1", "up-fake")
        with pytest.raises(UpstreamRequestError) as info:
            await b.agenerate("x", GenerationParams(max_tokens=5, stop=["a", "b", "c", "d", "e"]))
        assert info.value.status_code == 400 and isinstance(info.value, ValueError)
        await b.aclose()

    asyncio.run(main())


def test_astream_full_reply_and_usage(backend: OpenAIUpstreamBackend) -> None:
    async def main() -> None:
        for prompt in ("Say hello", [ChatMessage("user", "hi")]):
            chunks = [c async for c in backend.astream(prompt, GenerationParams(max_tokens=50))]
            assert "".join(c.text for c in chunks) == REPLY
            assert len(chunks) > 2
            last = chunks[-1]
            assert last.text == "" and last.finish_reason == "stop"
            assert last.completion_tokens == len(fake_tokens(REPLY))
            assert last.prompt_tokens is not None and last.prompt_tokens > 0
        chunks = [c async for c in backend.astream("Say hello", GenerationParams(max_tokens=3))]
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 3
        assert chunks[-1].prompt_tokens == 2
        # connection reuse is checked against a loopback upstream that counts its
        # connections: tests/models/test_upstream_faults.py
        await backend.aclose()

    asyncio.run(main())
