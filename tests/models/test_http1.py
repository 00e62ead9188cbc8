"""models.http1 against real loopback sockets: asyncio servers started inside each test."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from models.http1 import HTTP1Pool, HTTPConnectError, HTTPTimeout

Handler = Callable[["Upstream", int, asyncio.StreamReader, asyncio.StreamWriter],
                   Awaitable[None]]


@dataclass
class Request:
    line: str
    headers: dict[str, str]
    body: bytes


def reply(body: bytes = b"ok", status: str = "200 OK", extra: str = "",
          version: str = "HTTP/1.1") -> bytes:
    return (f"{version} {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode("latin-1") + body)


def chunk(data: bytes, ext: str = "") -> bytes:
    return f"{len(data):x}{ext}\r\n".encode() + data + b"\r\n"


class Upstream:
    """A loopback server: ``handler(self, index, reader, writer)`` runs per connection
    (``index`` counts connections from 0); it counts connections and open ones."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self.busy = 0
        self.max_busy = 0
        self.requests: list[Request] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for w in self._writers:
            w.close()
        # let the handlers see the close and end (a handler cancelled at loop teardown logs)
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 2)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        self._writers.append(writer)
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await self.handler(self, index, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> Request | None:
        """The next request, or None when the client closed the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        req = Request(lines[0], headers, body)
        self.requests.append(req)
        return req


async def serve_ok(up: Upstream, index: int, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
    """Keep-alive: answer every request with ``ok``."""
    while await up.read_request(reader) is not None:
        writer.write(reply())
        await writer.drain()


async def wait_for_close(reader: asyncio.StreamReader) -> None:
    """Until the client closes the connection (what it sends meanwhile is dropped)."""
    while await reader.read(1 << 16):
        pass


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1. Content-Length, head parsing, keep-alive ---------------------------------------
def test_content_length_body_status_headers_and_connection_reuse() -> None:
    async def handler(up, index, reader, writer):
        while (req := await up.read_request(reader)) is not None:
            body = b'{"echo": ' + req.body + b"}"
            writer.write(reply(body, "201 Created", "X-Custom-Header:  Some Value \r\n"))
            await writer.drain()

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url)
            r1 = await pool.post("/a", b"1")
            r2 = await pool.post("/b", b"2")
            assert r1.status_code == 201 and r1.content == b'{"echo": 1}'
            assert r1.headers["x-custom-header"] == "Some Value"
            assert r1.headers["content-length"] == "11"
            assert r2.content == b'{"echo": 2}'
            assert up.connections == 1 and len(up.requests) == 2
            await pool.aclose()

    run(main())


# --- 2. chunked bodies -----------------------------------------------------------------
SSE_PIECES = [b'data: {"a"', b': 1}\r', b'\n\r\ndata: {"b": 2, "pad": "' + b"x" * 20 + b'"}\r\n\r\nda',
              b"ta: [DONE]\r\n\r\n"]
SSE_LINES = ['data: {"a": 1}', "", 'data: {"b": 2, "pad": "' + "x" * 20 + '"}', "",
             "data: [DONE]", ""]


def chunked_sse_wire() -> bytes:
    """The SSE body as chunks (one with an extension), then the 0-chunk with trailers."""
    body = b"".join(chunk(p, ";ext=1" if i == 1 else "") for i, p in enumerate(SSE_PIECES))
    return body + b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"


def test_chunked_lines_split_awkwardly_trailers_consumed_and_connection_pooled() -> None:
    async def handler(up, index, reader, writer):
        while await up.read_request(reader) is not None:
            wire = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + chunked_sse_wire())
            for i in range(0, len(wire), 7):  # 7-byte writes: splits size lines, data, CRLFs
                writer.write(wire[i:i + 7])
                await writer.drain()
                await asyncio.sleep(0.002)

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, max_connections=1)
            async with pool.stream("/s", b"{}") as resp:
                assert resp.status_code == 200
                lines = [line async for line in resp.aiter_lines()]
            assert lines == SSE_LINES
            r = await asyncio.wait_for(pool.post("/s", b"{}"), 2)
            assert r.content == b"".join(SSE_PIECES)
            assert up.connections == 1 and len(up.requests) == 2
            await pool.aclose()

    run(main())


# --- 3. the keep-alive race ------------------------------------------------------------
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_reused_connection_closed_before_response_is_retried_on_a_new_one(how: str) -> None:
    async def handler(up, index, reader, writer):
        if index == 0:
            await up.read_request(reader)
            writer.write(reply())
            await writer.drain()
            await up.read_request(reader)  # the second request: drop it, no response byte
            if how == "rst":
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            return
        await serve_ok(up, index, reader, writer)

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, max_connections=1)
            assert (await pool.post("/x", b"1")).content == b"ok"
            r = await asyncio.wait_for(pool.post("/x", b"2"), 2)
            assert r.status_code == 200 and r.content == b"ok"
            assert up.connections == 2
            assert [q.body for q in up.requests] == [b"1", b"2", b"2"]
            await pool.aclose()

    run(main())


def test_idle_connection_closed_by_server_is_replaced_transparently() -> None:
    async def handler(up, index, reader, writer):
        await up.read_request(reader)
        writer.write(reply())
        await writer.drain()
        writer.close()  # keep-alive response, but the server drops the connection at once

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url)
            assert (await pool.post("/x", b"1")).content == b"ok"
            await asyncio.sleep(0.05)
            assert (await pool.post("/x", b"2")).content == b"ok"
            assert up.connections == 2
            await pool.aclose()

    run(main())


def test_fresh_connection_closed_before_response_is_a_connect_error_without_retry() -> None:
    async def handler(up, index, reader, writer):
        await up.read_request(reader)
        writer.close()

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, max_connections=1)
            with pytest.raises(HTTPConnectError):
                await asyncio.wait_for(pool.post("/x", b"1"), 2)
            assert up.connections == 1
            await pool.aclose()

    run(main())


def test_retry_happens_once_only() -> None:
    async def handler(up, index, reader, writer):
        if index == 0:
            await up.read_request(reader)
            writer.write(reply())
            await writer.drain()
        await up.read_request(reader)  # then every request is dropped unanswered
        writer.close()

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, max_connections=1)
            assert (await pool.post("/x", b"1")).content == b"ok"
            with pytest.raises(HTTPConnectError):
                await asyncio.wait_for(pool.post("/x", b"2"), 2)
            assert up.connections == 2 and len(up.requests) == 3
            await pool.aclose()

    run(main())


# --- 4. keep-alive expiry --------------------------------------------------------------
def test_idle_connection_older_than_keepalive_expiry_is_not_reused() -> None:
    async def main():
        async with Upstream(serve_ok) as up:
            pool = HTTP1Pool(up.url, keepalive_expiry=0.2)
            await pool.post("/x", b"1")
            await pool.post("/x", b"2")  # within the expiry: reused
            assert up.connections == 1
            await asyncio.sleep(0.3)
            assert (await pool.post("/x", b"3")).content == b"ok"
            assert up.connections == 2
            await asyncio.sleep(0.05)
            assert up.open == 1  # the expired connection was closed, not leaked
            await pool.aclose()

    run(main())


# --- 5. timeouts and refused connections -----------------------------------------------
def test_server_that_never_answers_times_out_within_timeout() -> None:
    async def handler(up, index, reader, writer):
        await wait_for_close(reader)

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, timeout=0.3)
            t0 = time.monotonic()
            with pytest.raises(HTTPTimeout):
                await pool.post("/x", b"1")
            assert 0.25 < time.monotonic() - t0 < 1.5
            await pool.aclose()

    run(main())


@pytest.mark.parametrize("mode", ["post", "stream"])
def test_server_stalling_mid_body_times_out_while_reading(mode: str) -> None:
    async def handler(up, index, reader, writer):
        if index > 0:
            return await serve_ok(up, index, reader, writer)
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await wait_for_close(reader)

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, timeout=0.3, max_connections=1)
            got: list[bytes] = []
            t0 = time.monotonic()
            with pytest.raises(HTTPTimeout):
                if mode == "post":
                    await pool.post("/x", b"1")
                else:
                    async with pool.stream("/x", b"1") as resp:
                        assert resp.status_code == 200
                        async for data in resp.aiter_raw():
                            got.append(data)
            assert 0.25 < time.monotonic() - t0 < 1.5
            assert b"".join(got) == (b"x" * 10 if mode == "stream" else b"")
            # the stalled connection was closed and its slot given back
            assert (await asyncio.wait_for(pool.post("/x", b"2"), 1)).content == b"ok"
            assert up.connections == 2
            await pool.aclose()

    run(main())


def test_connection_refused_is_a_connect_error() -> None:
    async def main():
        pool = HTTP1Pool(f"http://127.0.0.1:{closed_port()}", connect_timeout=1)
        with pytest.raises(HTTPConnectError):
            await pool.post("/x", b"1")
        with pytest.raises(HTTPConnectError):
            async with pool.stream("/x", b"1"):
                pass
        await pool.aclose()

    run(main())


# --- 6. broken and non-HTTP replies ----------------------------------------------------
@pytest.mark.parametrize("mode", ["post", "stream"])
def test_server_closing_mid_body_is_a_connect_error(mode: str) -> None:
    async def handler(up, index, reader, writer):
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"data: x\n" * 2)
        await writer.drain()
        writer.close()

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, timeout=2)
            with pytest.raises(HTTPConnectError):
                if mode == "post":
                    await pool.post("/x", b"1")
                else:
                    async with pool.stream("/x", b"1") as resp:
                        async for _ in resp.aiter_lines():
                            pass
            await pool.aclose()

    run(main())


def test_server_closing_mid_chunk_is_a_connect_error() -> None:
    async def handler(up, index, reader, writer):
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunk(b"data: 1\n\n") + b"20\r\ndata: 2")
        await writer.drain()
        writer.close()

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, timeout=2)
            lines = []
            with pytest.raises(HTTPConnectError):
                async with pool.stream("/x", b"1") as resp:
                    async for line in resp.aiter_lines():
                        lines.append(line)
            assert lines == ["data: 1", ""]
            await pool.aclose()

    run(main())


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"hello, not http",
                                     b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/2 200\r\n\r\n"],
                         ids=["ssh", "no-head-end", "bad-status", "http2"])
def test_non_http_reply_is_a_connect_error_and_frees_the_slot(garbage: bytes) -> None:
    async def handler(up, index, reader, writer):
        if index == 0:
            await up.read_request(reader)
            writer.write(garbage)
            await writer.drain()
            writer.close()
            return
        await serve_ok(up, index, reader, writer)

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, timeout=2, max_connections=1)
            with pytest.raises(HTTPConnectError):
                await pool.post("/x", b"1")
            assert (await asyncio.wait_for(pool.post("/x", b"2"), 1)).content == b"ok"
            assert up.connections == 2
            await pool.aclose()

    run(main())


@pytest.mark.parametrize("wire", [
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
], ids=["head-too-long", "bad-chunk-size"])
def test_malformed_response_is_a_connect_error(wire: bytes) -> None:
    async def handler(up, index, reader, writer):
        await up.read_request(reader)
        writer.write(wire)
        await writer.drain()
        await wait_for_close(reader)

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, timeout=2)
            with pytest.raises(HTTPConnectError):
                await asyncio.wait_for(pool.post("/x", b"1"), 2)
            await pool.aclose()

    run(main())


def test_garbage_reply_on_a_reused_connection_is_not_retried() -> None:
    async def handler(up, index, reader, writer):
        await up.read_request(reader)
        writer.write(reply())
        await up.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await wait_for_close(reader)

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, timeout=2, max_connections=1)
            await pool.post("/x", b"1")
            with pytest.raises(HTTPConnectError):
                await pool.post("/x", b"2")
            assert up.connections == 1 and len(up.requests) == 2  # the POST was not re-sent
            await pool.aclose()

    run(main())


# --- 7. leaving a stream early ---------------------------------------------------------
def test_leaving_a_stream_early_closes_the_connection_and_frees_the_slot() -> None:
    closed = asyncio.Event()

    async def handler(up, index, reader, writer):
        if index == 0:
            await up.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n"))
            await writer.drain()  # and the stream never ends
            await wait_for_close(reader)
            closed.set()
            return
        await serve_ok(up, index, reader, writer)

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, max_connections=1, timeout=5)
            async with pool.stream("/x", b"1") as resp:
                async for line in resp.aiter_lines():
                    assert line == "data: 1"
                    break
            await asyncio.wait_for(closed.wait(), 1)
            r = await asyncio.wait_for(pool.post("/x", b"2"), 1)
            assert r.content == b"ok" and up.connections == 2
            await pool.aclose()

    run(main())


# --- 8. max_connections ----------------------------------------------------------------
def test_max_connections_bounds_concurrency() -> None:
    async def handler(up, index, reader, writer):
        while await up.read_request(reader) is not None:
            up.busy += 1
            up.max_busy = max(up.max_busy, up.busy)
            await asyncio.sleep(0.1)
            up.busy -= 1
            writer.write(reply())
            await writer.drain()

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, max_connections=2)
            rs = await asyncio.wait_for(
                asyncio.gather(*(pool.post("/x", str(i).encode()) for i in range(4))), 2)
            assert [r.content for r in rs] == [b"ok"] * 4
            assert len(up.requests) == 4
            assert up.max_open == 2 and up.max_busy == 2 and up.connections == 2
            await pool.aclose()

    run(main())


# --- 9. responses that end the connection ----------------------------------------------
@pytest.mark.parametrize(("response", "connections"), [
    (reply(extra="Connection: close\r\n"), 2),
    (reply(extra="connection: Close\r\n"), 2),
    (reply(version="HTTP/1.0"), 2),
    (reply(version="HTTP/1.0", extra="Connection: keep-alive\r\n"), 1),
], ids=["close", "close-mixed-case", "http10", "http10-keep-alive"])
def test_connection_close_and_http10_responses_are_not_reused(response: bytes,
                                                              connections: int) -> None:
    async def handler(up, index, reader, writer):
        while await up.read_request(reader) is not None:  # the server itself keeps it open
            writer.write(response)
            await writer.drain()

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url)
            assert (await pool.post("/x", b"1")).content == b"ok"
            assert (await pool.post("/x", b"2")).content == b"ok"
            assert up.connections == connections
            await asyncio.sleep(0.05)
            # a connection not reused was closed by the client; a kept one stays open
            assert up.open == (1 if connections == 1 else 0)
            await pool.aclose()

    run(main())


def test_response_without_length_is_read_to_close_and_not_reused() -> None:
    async def handler(up, index, reader, writer):
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    async def main():
        async with Upstream(handler) as up:
            pool = HTTP1Pool(up.url, timeout=2)
            assert (await pool.post("/x", b"1")).content == b"until the end"
            assert (await pool.post("/x", b"2")).content == b"until the end"
            assert up.connections == 2
            await pool.aclose()

    run(main())


# --- 10. what is sent ------------------------------------------------------------------
@pytest.mark.parametrize(("prefix", "path", "line"), [
    ("/v1", "/chat/completions", "POST /v1/chat/completions HTTP/1.1"),
    ("/v1/", "/completions", "POST /v1/completions HTTP/1.1"),
    ("", "/completions", "POST /completions HTTP/1.1"),
])
def test_request_line_host_length_and_extra_headers(prefix: str, path: str, line: str) -> None:
    async def main():
        async with Upstream(serve_ok) as up:
            pool = HTTP1Pool(up.url + prefix, {"Authorization": "Bearer sk-test"})
            body = '{"model": "m", "prompt": "héllo"}'.encode()
            await pool.post(path, body)
            (req,) = up.requests
            assert req.line == line
            assert req.headers["host"] == f"127.0.0.1:{up.port}"
            assert req.headers["content-length"] == str(len(body))
            assert req.headers["authorization"] == "Bearer sk-test"
            assert req.headers["content-type"] == "application/json"
            assert "accept-encoding" not in req.headers
            assert req.body == body
            await pool.aclose()

    run(main())


# --- 11. bad base URLs -----------------------------------------------------------------
@pytest.mark.parametrize("url", ["ftp://x", "http://", "https://", "localhost:8000", "",
                                 "http://h:99999"])
def test_bad_base_url_is_a_value_error(url: str) -> None:
    with pytest.raises(ValueError):
        HTTP1Pool(url)


def test_https_base_url_defaults_to_port_443() -> None:
    pool = HTTP1Pool("https://example.invalid/v1")
    assert (pool.host, pool.port, pool.prefix) == ("example.invalid", 443, "/v1")
    assert pool.ssl is not None
    assert HTTP1Pool("http://example.invalid").port == 80
