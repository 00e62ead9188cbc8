"""The HTTP server under the router: uvicorn with limits a hostile client cannot outwait.

uvicorn bounds idle keep-alive connections but not a request that never finishes arriving:
a client that sends half its headers, or a body slower than a byte a minute, holds its
connection (and, for a body, the request handler) forever. :class:`GuardedH11Protocol`
gives each request a read deadline: its headers must arrive within ``header_timeout_s`` of
its first byte, and its body within ``body_timeout_s`` of its headers; past that the server
answers 408 and closes the connection. This happens before the app (and its API-key check)
sees the request, so it also covers clients without a key.

Limits (``router.settings.Settings``; defaults in brackets): ``header_timeout_s`` [10],
``body_timeout_s`` [30], ``keep_alive_s`` [75: longer than common clients' idle expiry, so
the client, not the server, closes an idle connection and no request races a close],
``max_connections`` [1024: beyond it new connections get 503].
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s")
_BODY = (b'{"error": {"message": "the request did not arrive in time", '
         b'"type": "invalid_request_error", "param": null, "code": "request_timeout"}}')


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a read deadline per request (see the module docstring)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._reading: Any = None  # the h11 state the timer was armed for

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # --- the read deadline -----------------------------------------------------------
    def _arm(self) -> None:
        """Header deadline while a request's head is incomplete (after its first byte),
        body deadline while its body arrives, none once it is all in (or between requests:
        keep-alive covers idle connections)."""
        state = self.conn.their_state
        if state is h11.IDLE and not self.conn.trailing_data[0]:
            self._disarm()  # nothing of the next request yet
            return
        if state is h11.IDLE:
            want, limit = "head", self.header_timeout_s
        elif state is h11.SEND_BODY:
            want, limit = "body", self.body_timeout_s
        else:
            self._disarm()
            return
        if self._reading != want:
            self._disarm()
            self._reading = want
            self._read_timer = self.loop.call_later(limit, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_read_timer", None) is not None:
            self._read_timer.cancel()  # type: ignore[union-attr]
        self._read_timer, self._reading = None, None

    def _expired(self) -> None:
        self._read_timer, self._reading = None, None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        cycle = self.cycle if self.conn.their_state is h11.SEND_BODY else None
        if cycle is None or not cycle.response_started:
            self.transport.write(_408 % (len(_BODY), _BODY))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() now returns http.disconnect
            cycle.message_event.set()
        self.transport.close()


def serve(app, host: str, port: int, settings=None, **kw: Any) -> None:
    """``uvicorn.run`` with the guarded protocol and the settings' connection limits."""
    import uvicorn

    limits = {"header_timeout_s": 10.0, "body_timeout_s": 30.0, "keep_alive_s": 75.0,
              "max_connections": 1024}
    if settings is not None:
        limits = {k: getattr(settings, k, v) for k, v in limits.items()}
    proto = type("ArchRouteH11Protocol", (GuardedH11Protocol,),
                 {"header_timeout_s": float(limits["header_timeout_s"]),
                  "body_timeout_s": float(limits["body_timeout_s"])})
    uvicorn.run(app, host=host, port=port, http=proto,
                timeout_keep_alive=int(limits["keep_alive_s"]),
                limit_concurrency=int(limits["max_connections"]), **kw)
