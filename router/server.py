"""The HTTP server under the router: uvicorn with limits a hostile client cannot outwait.

uvicorn bounds idle keep-alive connections but not a request that never finishes arriving:
a client that sends half its headers, or a body slower than a byte a minute, holds its
connection (and, for a body, the request handler) forever. The router's protocol (uvicorn's
httptools parser when installed, else h11, each with :class:`_ReadDeadline`) gives each
request a read deadline: its headers must arrive within ``header_timeout_s`` of
its first byte, and its body within ``body_timeout_s`` of its headers; past that the server
answers 408 and closes the connection. This happens before the app (and its API-key check)
sees the request, so it also covers clients without a key.

Limits (``router.settings.Settings``; defaults in brackets): ``header_timeout_s`` [10],
``body_timeout_s`` [30], ``keep_alive_s`` [75: longer than common clients' idle expiry, so
the client, not the server, closes an idle connection and no request races a close],
``max_connections`` [1024: beyond it new connections get 503]. ``archroute serve-model``
serves with the same ones.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from router.settings import Settings

_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s")
_BODY = (b'{"error": {"message": "the request did not arrive in time", '
         b'"type": "invalid_request_error", "param": null, "code": "request_timeout"}}')


class _ReadDeadline:
    """The read-deadline timer both protocols share: :meth:`_arm` for the head or the body,
    :meth:`_disarm` once the request is in, :meth:`_expired` answers 408 and closes."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    _read_timer: asyncio.TimerHandle | None = None
    _reading: str | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self, want: str) -> None:
        if self._reading == want:
            return
        self._disarm()
        self._reading = want
        limit = self.header_timeout_s if want == "head" else self.body_timeout_s
        self._read_timer = self.loop.call_later(limit, self._expired)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer, self._reading = None, None

    def _expired(self) -> None:
        reading, self._read_timer, self._reading = self._reading, None, None
        transport = self.transport  # type: ignore[attr-defined]
        if transport.is_closing():
            return
        cycle = self.cycle if reading == "body" else None  # type: ignore[attr-defined]
        if cycle is None or not cycle.response_started:
            transport.write(_408 % (len(_BODY), _BODY))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() now returns http.disconnect
            cycle.message_event.set()
        transport.close()


class GuardedH11Protocol(_ReadDeadline, H11Protocol):
    """uvicorn's h11 protocol with a read deadline per request (see the module docstring)."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """Head deadline while a request's head is incomplete (after its first byte), body
        deadline while its body arrives, none once it is all in or between requests
        (keep-alive covers idle connections)."""
        state = self.conn.their_state
        if state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm("head")
        elif state is h11.SEND_BODY:
            self._arm("body")
        else:
            self._disarm()


def _httptools_protocol():
    """uvicorn's httptools protocol (the faster parser) with the same read deadlines, or
    None when httptools is not installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class GuardedHttpToolsProtocol(_ReadDeadline, HttpToolsProtocol):
        def on_message_begin(self) -> None:  # the request's first byte
            super().on_message_begin()
            self._arm("head")

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._arm("body")

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()

    return GuardedHttpToolsProtocol


def serve(app, host: str, port: int, settings: Settings, pid_file: str | None = None,
          **kw: Any) -> None:
    """``uvicorn.run`` with the guarded protocol and the settings' connection limits (the
    router's and serve-model's alike); ``pid_file``: this process's id, written before
    serving and removed after."""
    import os
    from pathlib import Path

    import uvicorn

    if pid_file:
        Path(pid_file).write_text(f"{os.getpid()}\n")
        import signal

        # uvicorn shuts down gracefully on SIGTERM, then re-raises it under the handler it
        # found: this one, so the process leaves through ``finally`` (and the pid file goes)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        _run(uvicorn, app, host, port, settings, **kw)
    finally:
        pid = Path(pid_file) if pid_file else None
        if pid is not None and pid.exists() and pid.read_text().strip() == str(os.getpid()):
            pid.unlink()  # ours (another server may have taken the path since)


def _run(uvicorn, app, host: str, port: int, settings: Settings, **kw: Any) -> None:
    base = _httptools_protocol() or GuardedH11Protocol
    proto = type("ArchRouteHTTPProtocol", (base,),
                 {"header_timeout_s": float(settings.header_timeout_s),
                  "body_timeout_s": float(settings.body_timeout_s)})
    uvicorn.run(app, host=host, port=port, http=proto,
                timeout_keep_alive=int(settings.keep_alive_s),
                limit_concurrency=int(settings.max_connections), **kw)
