"""A lean asyncio HTTP/1.1 client for one upstream: the router's hot path to an engine.

Why not httpx: in front of an instant upstream, a py-spy profile of the router put 44% of its
busy time in ``httpx.AsyncClient`` (docs/router.md, "Overhead"). The router talks to one
host per backend, always ``POST`` with a JSON body, and reads either a ``Content-Length``
body or a chunked SSE stream, so the client it needs is small: a pool of keep-alive
connections (LIFO, idle ones dropped after ``keepalive_expiry`` s, before the server's own
keep-alive closes them under us), a request written in one ``write``, the response head
read with one ``readuntil``.

Not supported, on purpose: proxies (``HTTP_PROXY`` is ignored), redirects, HTTP/2,
compressed responses (no ``Accept-Encoding`` is sent). The synchronous paths of
:mod:`models.upstream` still use httpx.

Errors: :class:`HTTPTimeout` (connect or read past its limit), :class:`HTTPConnectError`
(refused, reset, closed early, or a response that is not HTTP/1.x).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024  # a response head longer than this is refused


class HTTPTimeout(TimeoutError):
    """Connecting or reading took longer than its limit."""


class HTTPConnectError(ConnectionError):
    """The connection failed, broke, or the peer did not speak HTTP/1.x."""


class _Conn:
    __slots__ = ("reader", "writer", "idle_since", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.reused = False

    def usable(self, now: float, expiry: float) -> bool:
        return (now - self.idle_since < expiry and not self.reader.at_eof()
                and not self.writer.is_closing())

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001  (closing a broken transport must not raise)
            pass


class Response:
    """Status, lower-cased headers, and the body (read by :meth:`aread` or line by line)."""

    __slots__ = ("status_code", "headers", "_conn", "_pool", "_chunked", "_left", "_done",
                 "_timeout", "content")

    def __init__(self, status: int, headers: dict[str, str], conn: _Conn, pool: HTTP1Pool,
                 timeout: float) -> None:
        self.status_code = status
        self.headers = headers
        self._conn = conn
        self._pool = pool
        self._timeout = timeout
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._left: int | None = int(length) if length is not None and not self._chunked else None
        if status in (204, 304) or 100 <= status < 200:  # never a body
            self._chunked, self._left = False, 0
        self._done = False
        self.content = b""

    async def _read(self, coro):
        try:
            async with asyncio.timeout(self._timeout):
                return await coro
        except TimeoutError as exc:
            raise HTTPTimeout(f"no data from the upstream within {self._timeout:g} s") from exc
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            raise HTTPConnectError(f"upstream connection broke: {type(exc).__name__}") from exc

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunks of a chunked body; otherwise what the socket has)."""
        r = self._conn.reader
        if self._chunked:
            while True:
                line = await self._read(r.readuntil(b"\r\n"))
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError as exc:
                    raise HTTPConnectError("bad chunk size from the upstream") from exc
                if size == 0:
                    while (await self._read(r.readuntil(b"\r\n"))) != b"\r\n":
                        pass  # trailers
                    break
                data = await self._read(r.readexactly(size + 2))
                yield data[:-2]
        elif self._left is not None:
            while self._left > 0:
                data = await self._read(r.read(min(self._left, 1 << 16)))
                if not data:
                    raise HTTPConnectError("upstream closed the connection mid-body")
                self._left -= len(data)
                yield data
        else:  # no length: the body ends when the connection does
            while data := await self._read(r.read(1 << 16)):
                yield data
            self.headers["connection"] = "close"
        self._done = True

    async def aread(self) -> bytes:
        r = self._conn.reader
        if self._left is not None:
            self.content = await self._read(r.readexactly(self._left)) if self._left else b""
            self._left, self._done = 0, True
        else:
            self.content = b"".join([d async for d in self.aiter_raw()])
        return self.content

    async def aiter_lines(self) -> AsyncIterator[str]:
        """Decoded lines without their ``\\n`` / ``\\r\\n`` (SSE framing)."""
        buf = b""
        async for data in self.aiter_raw():
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode("utf-8", "replace")
        if buf:
            yield buf.rstrip(b"\r").decode("utf-8", "replace")

    def release(self) -> None:
        """Back to the pool if the body was read whole and the server keeps the connection;
        closed otherwise (a client that stopped reading mid-stream)."""
        keep = self._done and self.headers.get("connection", "").lower() != "close"
        self._pool._put(self._conn, keep)


class HTTP1Pool:
    """Keep-alive connections to the host of ``base_url`` (``http`` or ``https``); request
    paths are appended to ``base_url``'s path. At most ``max_connections`` at once."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None,
                 max_connections: int = 64, keepalive_expiry: float = 4.0,
                 connect_timeout: float = 5.0, timeout: float = 60.0) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base URL must be http(s)://host[:port][/path], got {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        self.prefix = u.path.rstrip("/")
        host_header = u.netloc.rsplit("@", 1)[-1]
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head_tail = (f"Host: {host_header}\r\nAccept: */*\r\n"
                           f"Content-Type: application/json\r\n{extra}").encode("latin-1")
        self.keepalive_expiry = keepalive_expiry
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._idle: list[_Conn] = []
        self._slots = asyncio.BoundedSemaphore(max_connections) if max_connections else None
        self._closed = False

    # --- connections ---------------------------------------------------------------
    async def _connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                r, w = await asyncio.open_connection(self.host, self.port, ssl=self.ssl,
                                                     limit=MAX_HEAD_BYTES)
        except TimeoutError as exc:
            raise HTTPTimeout(f"connecting to {self.host}:{self.port} took over "
                              f"{self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise HTTPConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return _Conn(r, w)

    def _get_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            c = self._idle.pop()
            if c.usable(now, self.keepalive_expiry):
                c.reused = True
                return c
            c.close()
        return None

    def _put(self, conn: _Conn, keep: bool) -> None:
        if keep and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        if self._slots is not None:
            self._slots.release()

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    # --- requests ------------------------------------------------------------------
    async def _send(self, conn: _Conn, path: str, body: bytes) -> Response:
        head = (f"POST {self.prefix}{path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
                .encode("latin-1") + self._head_tail + b"\r\n")
        async with asyncio.timeout(self.timeout):
            conn.writer.write(head + body)
            await conn.writer.drain()
            raw = await conn.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HTTPConnectError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if parts[0] == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
            headers["connection"] = "close"
        return Response(int(parts[1]), headers, conn, self, self.timeout)

    async def _open(self, path: str, body: bytes) -> Response:
        """Send on a pooled connection (once more on a new one if a reused connection turns
        out closed before any response byte: the keep-alive race); the slot is held until
        the response is released."""
        if self._slots is not None:
            await self._slots.acquire()
        try:
            conn = self._get_idle() or await self._connect()
            try:
                return await self._send(conn, path, body)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                conn.close()
                if not conn.reused or isinstance(exc, HTTPConnectError) or (
                        isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                    raise  # a fresh connection, or a response byte came (non-HTTP reply)
                conn = await self._connect()
                return await self._send(conn, path, body)
        except BaseException as exc:
            if "conn" in locals():
                conn.close()
            if self._slots is not None:
                self._slots.release()
            if isinstance(exc, TimeoutError) and not isinstance(exc, HTTPTimeout):
                raise HTTPTimeout(f"no response from the upstream within {self.timeout:g} s") from exc
            if isinstance(exc, asyncio.IncompleteReadError | asyncio.LimitOverrunError | OSError) \
                    and not isinstance(exc, HTTPConnectError | HTTPTimeout):
                raise HTTPConnectError(f"upstream connection broke: {type(exc).__name__}") from exc
            raise

    async def post(self, path: str, body: bytes) -> Response:
        """A whole response: status, headers and ``content``, within ``timeout`` for the
        head and again for the body."""
        resp = await self._open(path, body)
        try:
            await resp.aread()
        finally:
            resp.release()
        return resp

    @asynccontextmanager
    async def stream(self, path: str, body: bytes) -> AsyncIterator[Response]:
        """The response with its head read; iterate its body. Each read waits at most
        ``timeout``. Leaving early closes the connection instead of pooling it."""
        resp = await self._open(path, body)
        try:
            yield resp
        finally:
            resp.release()
