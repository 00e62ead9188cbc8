"""Outcomes of served responses: ``POST /v1/feedback`` (docs/learning-loop.md).

A client reports, for a response id (``chatcmpl-...`` / ``cmpl-...``), one of:

- ``reward``: a number in [-1, 1];
- ``thumbs``: ``"up"`` (stored as reward +1) or ``"down"`` (-1);
- ``reference``: the answer the request should have had. The router scores it under both
  backends *off the request path* (a bounded queue and one worker task; a full queue is a
  429) and stores the measured gap, ``loss_transformer - loss_hybrid`` in nats/token, as a
  label row: what ``archroute label`` measures offline, for live traffic. Scoring needs the
  request's prompt, so it needs ``log_prompts``.

Each response takes one reward and one reference, once: the same body again is a 200 with
``"duplicate": true``; a different reward (or reference) for a response that has one is a
409. A reward is committed to the decision log before the 200 is sent (a worker thread, not
the batching writer), so a crash loses no acknowledged feedback; an acknowledged reference
is committed as ``queued`` first and picked up again after a restart.

Feedback never takes from serving: its database calls run on its own few threads
(:data:`DB_THREADS`), never the default executor where in-process backends generate and
long prompts are scored, and it waits for a decision row not committed yet with
``asyncio.sleep``, holding no thread. Each API key (each client address, without keys) has a
token bucket (``feedback_rate_per_s``, ``feedback_burst``) for ``POST``: beyond it a 429
with ``Retry-After``. A database that cannot be reached is a 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from router import errors
from router import protocol as P
from router.decision_log import DecisionLogUnavailable
from router.errors import (
    APIError,
    ConflictError,
    InvalidRequestError,
    OverloadedError,
    UnavailableError,
)
from router.learning.references import ScoringSlot, label_request, measure

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from router.decision_log import DecisionLog

log = logging.getLogger(__name__)

THUMBS = {"up": 1.0, "down": -1.0}
DB_THREADS = 4  # feedback's own threads for decision log calls (lookups, commits)
_PENDING_POLL_S = 0.005  # how often a lookup looks whether the writer committed its row
_T = TypeVar("_T")


class Served(Protocol):
    """What feedback needs of the router (:class:`router.serving.RouterService`): its
    decision log and its backends' slots by role."""

    @property
    def decision_log(self) -> DecisionLog | None: ...

    @property
    def slots(self) -> Mapping[str, ScoringSlot]: ...


class FeedbackSettings(Protocol):
    """The router settings feedback reads (:class:`router.settings.Settings`)."""

    feedback_queue_size: int
    feedback_rate_per_s: float
    feedback_burst: int
    feedback_max_reference_chars: int


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: the response ``id`` and exactly one of ``reward`` (a number in
    [-1, 1]), ``thumbs`` (``up`` = +1, ``down`` = -1) or ``reference`` (the answer text)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    reward: float | None = Field(None, strict=True)  # a JSON number: "0.5" or true is a 400
    thumbs: Literal["up", "down"] | None = None
    reference: str | None = Field(None, min_length=1)

    @field_validator("id", "reference")
    @classmethod
    def _unicode(cls, v, info):
        return P.no_surrogates(v, info.field_name)


class ResponseNotFoundError(APIError):
    status, type, code = 404, "invalid_request_error", "response_not_found"


class FeedbackQueueFullError(OverloadedError):
    code = "feedback_queue_full"


class RetryLaterError(APIError):
    """An error the client should retry after ``retry_after_s`` (the ``Retry-After``
    header, whole seconds, at least 1)."""

    def __init__(self, message: str, retry_after_s: float, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class FeedbackRateLimitedError(RetryLaterError):
    status, type, code = 429, "rate_limit_error", "feedback_rate_limited"


class DecisionLogUnavailableError(RetryLaterError):
    status, type, code = 503, UnavailableError.type, "decision_log_unavailable"


def install(app: FastAPI) -> None:
    """Send :class:`RetryLaterError` in the envelope with its ``Retry-After`` header."""

    @app.exception_handler(RetryLaterError)
    async def _retry_later(request: Request, exc: RetryLaterError) -> JSONResponse:
        return errors.error_response(exc, headers=exc.headers)


def client_key(request: Request) -> str:
    """Whose feedback this is, for the rate limit: the API key (a digest of it), or the
    client's address when the router has no keys."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return "key:" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "unknown")


class RateLimiter:
    """A token bucket per key: ``burst`` requests at once, refilled at ``rate_per_s``. Keys
    whose bucket is full again are forgotten when more than ``max_keys`` are held."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s, self.burst, self.max_keys, self.clock = rate_per_s, burst, max_keys, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when it had one, else the seconds until it will."""
        now = self.clock()
        tokens, then = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate_per_s)
        if len(self._buckets) >= self.max_keys:
            self._forget(now)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate_per_s

    def _forget(self, now: float) -> None:
        full_after = self.burst / self.rate_per_s
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        while len(self._buckets) >= self.max_keys:  # all busy: the least recent go
            del self._buckets[next(iter(self._buckets))]


class FeedbackService:
    """Feedback for one router: validation, the rate limit, storage on its own threads, and
    the reference-scoring queue with its one worker task."""

    def __init__(self, service: Served, queue_size: int = 64,
                 rate_per_s: float = 20.0, burst: int = 40,
                 max_reference_chars: int = 32_768) -> None:
        self.service = service
        self.dlog: DecisionLog | None = service.decision_log
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(queue_size)
        self.limiter = RateLimiter(rate_per_s, burst)
        self.max_reference_chars = max_reference_chars
        # never the default executor: that one generates (in-process backends) and scores
        self._pool = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="feedback-db")
        self._worker: asyncio.Task | None = None
        self.scored = 0  # references scored by this process (tests, logs)

    @classmethod
    def from_settings(cls, service: Served, settings: FeedbackSettings) -> FeedbackService:
        return cls(service, settings.feedback_queue_size, settings.feedback_rate_per_s,
                   settings.feedback_burst, settings.feedback_max_reference_chars)

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        if self.dlog is None:
            return
        if self.dlog.log_prompts:  # references acknowledged before a restart
            for rid, ref in await self._db(self.dlog.queued_references, self.queue.maxsize):
                self.queue.put_nowait((rid, ref))
        self._worker = asyncio.create_task(self._work(), name="feedback-scoring")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- the decision log, off the serving threads ------------------------------------
    async def _db(self, fn: Callable[..., _T], *args: Any, **kw: Any) -> _T:
        """``fn(*args, **kw)`` on feedback's own threads; an unreachable database is a 503."""
        call = functools.partial(fn, *args, **kw)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except DecisionLogUnavailable as exc:
            log.warning("feedback: the decision log is unavailable: %s", exc)
            raise DecisionLogUnavailableError(
                "the decision log cannot be reached right now; retry later",
                retry_after_s=1.0) from None

    async def _find(self, dlog: DecisionLog, rid: str, wait_s: float = 2.0) -> dict | None:
        """The served decision for ``rid``, or None. A row this process has not committed
        yet is waited for (up to ``wait_s``: the writer is asked to commit at once); one
        another replica wrote is looked for again after two batch windows (its writer's
        delay). The waits are ``asyncio.sleep``: no thread is held."""
        if wait_s > 0 and dlog.is_pending(rid):
            dlog.hurry()
            deadline = time.monotonic() + wait_s
            while dlog.is_pending(rid) and not dlog.outage and time.monotonic() < deadline:
                await asyncio.sleep(_PENDING_POLL_S)
        row = await self._db(dlog.lookup, rid)
        if row is None and wait_s > 0:
            await asyncio.sleep(4 * dlog.batch_window_s)
            row = await self._db(dlog.lookup, rid)
        return row

    def admit(self, client: str) -> None:
        """The rate limit: a 429 with ``Retry-After`` when ``client`` has no token left."""
        wait = self.limiter.take(client)
        if wait > 0:
            raise FeedbackRateLimitedError(
                f"too much feedback from this client: at most {self.limiter.burst} at once "
                f"and {self.limiter.rate_per_s:g} per second (feedback_burst, "
                "feedback_rate_per_s); retry later", retry_after_s=wait)

    # --- the endpoint ----------------------------------------------------------------
    def _log(self) -> DecisionLog:
        if self.dlog is None:
            raise InvalidRequestError("feedback is stored beside the decision it is about, and "
                                      "this router keeps no decision log: set decision_log "
                                      "(a SQLite path or a PostgreSQL URL) to accept feedback",
                                      code="feedback_unavailable")
        return self.dlog

    async def submit(self, body: FeedbackRequest, client: str = "") -> dict:
        self.admit(client)
        dlog = self._log()
        given = [k for k in ("reward", "thumbs", "reference") if getattr(body, k) is not None]
        if len(given) != 1:
            raise InvalidRequestError(
                "give exactly one of reward (a number in [-1, 1]), thumbs ('up' or 'down') or "
                f"reference (the answer text); got {', '.join(given) or 'none'}",
                param=given[1] if len(given) > 1 else None)
        if body.reward is not None and not (math.isfinite(body.reward)
                                            and -1.0 <= body.reward <= 1.0):
            raise InvalidRequestError(f"reward: must be a number in [-1, 1], got {body.reward}",
                                      param="reward")
        if body.reference is not None and len(body.reference) > self.max_reference_chars:
            raise InvalidRequestError(
                f"reference: at most {self.max_reference_chars} characters "
                f"(feedback_max_reference_chars), got {len(body.reference)}",
                param="reference", code="reference_too_long")
        if body.reference is not None and not dlog.log_prompts:
            raise InvalidRequestError(
                "reference: scoring a reference needs the request's prompt, and this router "
                "does not keep prompts: start it with log_prompts: true (--log-prompts)",
                param="reference", code="prompts_not_logged")
        row = await self._find(dlog, body.id)
        if row is None:
            raise ResponseNotFoundError(
                f"no response with id {body.id!r} in the decision log (an unknown id, a "
                "request that was not served, or one deleted after "
                "decision_log_retention_days)", param="id")
        if body.reference is not None:
            return await self._reference(dlog, body.id, body.reference, row)
        reward = body.reward if body.reward is not None else THUMBS[body.thumbs or "up"]
        kind = "reward" if body.reward is not None else "thumbs"
        status, stored = await self._db(dlog.add_feedback, body.id, reward, kind)
        if status == "conflict":
            raise ConflictError(f"response {body.id!r} already has reward {stored:g}; "
                                "feedback for a response is final", param="reward")
        return {"object": "archroute.feedback", "id": body.id, "reward": reward,
                "duplicate": status == "duplicate"}

    async def _reference(self, dlog: DecisionLog, rid: str, reference: str, row: dict) -> dict:
        if row.get("prompt") is None and row.get("request") is None:
            raise InvalidRequestError(
                f"reference: the decision for {rid!r} was logged without its prompt "
                "(log_prompts was off when it was served); it cannot be scored",
                param="reference", code="prompts_not_logged")
        if row.get("decision") not in ("transformer", "hybrid"):
            raise InvalidRequestError(
                f"reference: {rid!r} was span-decoded; a reference label compares the two "
                "backends on one request routed whole", param="reference")
        sha = hashlib.sha256(reference.encode()).hexdigest()
        if self.queue.full():  # refuse before storing anything
            raise self._full()
        status = await self._db(dlog.add_reference, rid, reference, sha)
        if status == "conflict":
            raise ConflictError(f"response {rid!r} already has a different reference; "
                                "feedback for a response is final", param="reference")
        if status == "new":
            try:
                self.queue.put_nowait((rid, reference))
            except asyncio.QueueFull:
                await self._db(dlog.drop_reference, rid)
                raise self._full() from None
        return {"object": "archroute.feedback", "id": rid, "reference": "queued",
                "duplicate": status == "duplicate"}

    def _full(self) -> FeedbackQueueFullError:
        return FeedbackQueueFullError(
            f"the queue of references waiting to be scored is full ({self.queue.maxsize}, "
            "feedback_queue_size); retry later", param="reference")

    async def outcome(self, rid: str) -> dict:
        """``GET /v1/feedback/{id}``: what is stored for a response (one query, no wait: not
        rate limited, so a client may poll for a label)."""
        dlog = self._log()
        if await self._find(dlog, rid, 0.0) is None:
            raise ResponseNotFoundError(f"no response with id {rid!r} in the decision log",
                                        param="id")
        out = await self._db(dlog.outcome, rid)
        return {"object": "archroute.feedback", "id": rid, **out}

    # --- scoring references, off the request path -------------------------------------
    async def _work(self) -> None:
        assert self.dlog is not None
        me = asyncio.current_task()
        while True:
            # a cancellation a wait swallowed (Python 3.11's wait_for can lose one that lands
            # as its inner call completes) must still end the worker: stop() waits for it
            if me is not None and me.cancelling():
                raise asyncio.CancelledError
            rid, reference = await self.queue.get()
            try:
                fields = await self._score(rid, reference)
                await self._db(self.dlog.set_label, rid, "done", **fields)
                self.scored += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded on the label row
                log.warning("reference for %s not scored: %s: %s", rid, type(exc).__name__, exc)
                with contextlib.suppress(Exception):
                    await self._db(self.dlog.set_label, rid, "failed",
                                   error=f"{type(exc).__name__}: {exc}"[:500])
            finally:
                self.queue.task_done()

    async def _score(self, rid: str, reference: str) -> dict:
        assert self.dlog is not None
        row = await self._find(self.dlog, rid, 0.0)
        if row is None:
            raise LookupError("the decision is gone (retention)")
        return await measure(label_request(rid, row, reference), self.service.slots["transformer"],
                             self.service.slots["hybrid"], self._db)
