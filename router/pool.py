"""One backend as the router runs it: a concurrency limit with a bounded queue, timeouts,
and a cool-down circuit breaker.

- At most ``max_concurrency`` calls run at once; up to ``max_queue`` more wait, at most
  ``queue_timeout_s``. Past that a call is refused (429 when the queue is full, 503 when
  the wait runs out): never an unbounded queue.
- ``failure_threshold`` consecutive failures open the breaker for ``cooldown_s``; then one
  request is let through as a probe: success closes the breaker, failure re-opens it. A probe
  that ends without a verdict (the request's own fault, e.g. too long for the context, or the
  client gone) hands the probe to the next request; and a probe that has not answered within
  ``timeout_s`` no longer blocks the next one, so a healthy backend is back in service within
  one cool-down whatever the requests in between did.
- In-process backends run their forward pass in a worker thread that cannot be stopped: on
  a timeout the router answers at once, but the slot stays taken until the thread finishes,
  so a stuck model cannot pile up threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from models.base import (
    Backend,
    BackendError,
    GenerationParams,
    GenerationResult,
    Prompt,
    PromptScore,
    RequestError,
    ScoreResult,
    StreamChunk,
)
from router.errors import OverloadedError, UnavailableError
from router.settings import BackendSettings, Settings

log = logging.getLogger(__name__)

_SPARE_POLL_S = 0.02  # how often spare-only work looks for spare capacity (BackendSlot.score)
_R = TypeVar("_R")


def _default(model: type, name: str):
    """A settings field's default: the limits below are the settings', stated once there."""
    return model.model_fields[name].default  # type: ignore[attr-defined]


@dataclass
class SlotLimits:
    """One backend slot's limits; each default is the router setting's (router/settings.py)."""

    timeout_s: float = _default(BackendSettings, "timeout_s")
    max_concurrency: int = 1  # the settings' default depends on the kind (BackendSettings.concurrency)
    max_queue: int = _default(BackendSettings, "max_queue")
    queue_timeout_s: float = _default(BackendSettings, "queue_timeout_s")
    failure_threshold: int = _default(Settings, "failure_threshold")
    cooldown_s: float = _default(Settings, "cooldown_s")


def as_backend_error(name: str, exc: BaseException) -> BaseException:
    """Errors a backend raises, with surprises (a bug, a CUDA error, a stray ``ValueError``)
    turned into a :class:`BackendError` so they count as backend failures (502, fallback),
    not router bugs (500) nor the client's fault (only :class:`RequestError` is)."""
    if isinstance(exc, (BackendError, RequestError, TimeoutError, asyncio.CancelledError)):
        return exc
    # the exception's own text (torch, CUDA, tokenizer internals, paths) is logged, not sent
    log.warning("%s: %s: %s", name, type(exc).__name__, exc)
    err = BackendError(f"{name}: internal error ({type(exc).__name__})")
    err.__cause__ = exc
    return err


def _native_async(backend: Backend) -> bool:
    """True when the backend overrides the thread-wrapping async methods (e.g. HTTP)."""
    return type(backend).agenerate is not Backend.agenerate


class BackendSlot:
    """A backend plus its limits and breaker state. Use from one event loop."""

    def __init__(self, role: str, backend: Backend, limits: SlotLimits) -> None:
        self.role = role
        self.backend = backend
        self.name = backend.name
        self.limits = limits
        self._sem = asyncio.Semaphore(limits.max_concurrency)
        self.in_flight = 0
        self.waiting = 0
        self.failures = 0  # consecutive
        self.open_until = 0.0  # monotonic time the breaker stays open until
        self.probing = False
        self.probe_deadline = 0.0  # a probe unanswered by then lets the next request probe

    # --- breaker -------------------------------------------------------------------
    @property
    def state(self) -> str:
        """'closed' (serving), 'open' (cooling down) or 'half-open' (ready for a probe)."""
        if self.open_until == 0.0:
            return "closed"
        now = time.monotonic()
        probing = self.probing and now < self.probe_deadline
        return "open" if now < self.open_until or probing else "half-open"

    def available(self) -> bool:
        return self.state != "open"

    def record_success(self) -> None:
        self.failures, self.open_until, self.probing = 0, 0.0, False

    def record_failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.limits.failure_threshold:
            self.open_until = time.monotonic() + self.limits.cooldown_s
        self.probing = False

    def abandon_probe(self, is_probe: bool) -> None:
        """A call ended with no verdict on the backend (the request's own fault, or the
        client went away): if it was the probe, the next request probes instead."""
        if is_probe:
            self.probing = False

    # --- admission -------------------------------------------------------------------
    def _budget(self, limit: float, deadline: float | None) -> float:
        """``limit`` seconds, or less when the request's deadline comes first."""
        if deadline is None:
            return limit
        return min(limit, deadline - time.monotonic())

    async def acquire(self, deadline: float | None = None) -> bool:
        """Take a slot or raise :class:`UnavailableError` / :class:`OverloadedError` (or
        TimeoutError when the request's ``deadline``, a monotonic time, passes first). True
        when this call is the breaker's probe."""
        state = self.state
        if state == "open":
            raise UnavailableError(f"backend {self.name} is cooling down after failures")
        full = self.in_flight >= self.limits.max_concurrency
        if full and self.waiting >= self.limits.max_queue:
            raise OverloadedError(f"backend {self.name} is at capacity "
                                  f"({self.in_flight} running, {self.waiting} waiting)")
        wait = self._budget(self.limits.queue_timeout_s, deadline)
        if wait <= 0:
            raise TimeoutError(f"{self.name}: the request's deadline passed before it was sent")
        self.waiting += 1
        try:
            async with asyncio.timeout(wait):  # not wait_for: in 3.11 it can lose a
                await self._sem.acquire()     # cancellation that lands as it completes
        except TimeoutError:
            if wait < self.limits.queue_timeout_s:
                raise TimeoutError(f"{self.name}: the request's deadline passed while it "
                                   "waited for a slot") from None
            raise UnavailableError(f"backend {self.name}: no free slot within "
                                   f"{self.limits.queue_timeout_s:g} s") from None
        finally:
            self.waiting -= 1
        self.in_flight += 1
        if self.state == "half-open":  # re-read: another probe may have started meanwhile
            self.probing = True
            self.probe_deadline = time.monotonic() + self.limits.timeout_s
            return True
        return False

    def release(self) -> None:
        self.in_flight -= 1
        self._sem.release()

    # --- calls -------------------------------------------------------------------------
    async def generate(self, prompt: Prompt, params: GenerationParams,
                       deadline: float | None = None) -> GenerationResult:
        """One whole generation within ``timeout_s`` (and before ``deadline``, the request's
        end-to-end limit as a monotonic time); updates the breaker."""
        return await self._call(lambda: self.backend.agenerate(prompt, params), deadline)

    async def score(self, prompt: str, continuation: str, deadline: float | None = None,
                    spare_only: bool = False) -> ScoreResult:
        """``continuation`` scored after ``prompt`` (``Backend.ascore``) like a request: a
        slot taken, within ``timeout_s`` and ``deadline``, the breaker told. With
        ``spare_only`` (work that must never delay a request: labels from references) it
        first waits until the backend has spare capacity: breaker closed, nobody queued, a
        free slot."""
        if spare_only:
            while not self.has_spare():
                await asyncio.sleep(_SPARE_POLL_S)
        return await self._call(lambda: self.backend.ascore(prompt, continuation), deadline)

    async def score_prompt(self, prompt: Prompt, deadline: float | None = None) -> PromptScore:
        """The prompt's own log-probabilities (``Backend.ascore_prompt``, the prompt probe)
        like a request: a slot taken, within ``timeout_s`` and ``deadline``, the breaker
        told. A caller that gives up sooner (the probe's own deadline) cancels it: no
        verdict for the breaker."""
        return await self._call(lambda: self.backend.ascore_prompt(prompt), deadline)

    def has_spare(self) -> bool:
        """No request waits, a slot is free and the breaker is closed."""
        return (self.state == "closed" and self.waiting == 0
                and self.in_flight < self.limits.max_concurrency)

    async def _call(self, start: Callable[[], Awaitable[_R]], deadline: float | None) -> _R:
        """``start()`` with a slot held, within ``timeout_s`` and ``deadline``; the breaker
        hears the verdict (a :class:`RequestError` or a client gone is none)."""
        is_probe = await self.acquire(deadline)
        task = asyncio.ensure_future(start())
        task.add_done_callback(lambda _t: self.release())
        try:
            budget = max(0.0, self._budget(self.limits.timeout_s, deadline))
            done, _ = await asyncio.wait({task}, timeout=budget)
            if not done:
                if _native_async(self.backend):
                    task.cancel()
                raise TimeoutError(f"{self.name} gave no answer within {budget:g} s")
            try:
                result = task.result()
            except Exception as exc:  # noqa: BLE001
                raise as_backend_error(self.name, exc) from exc
        except asyncio.CancelledError:
            if _native_async(self.backend):
                task.cancel()
            self.abandon_probe(is_probe)
            raise
        except RequestError:  # the request's fault (e.g. too long): not a backend failure
            self.abandon_probe(is_probe)
            raise
        except Exception:
            self.record_failure()
            raise
        self.record_success()
        return result

    @contextlib.asynccontextmanager
    async def held(self, deadline: float | None = None) -> AsyncIterator[None]:
        """A slot held for a call its caller makes itself (one span of a span answer over
        engines, :mod:`models.span.remote`): admitted as a call (limits, queue, breaker), and
        the breaker hears how the block ended: a success, a failure on an exception, no
        verdict on a :class:`RequestError` or when the caller stops (cancelled, or closed)."""
        is_probe = await self.acquire(deadline)
        try:
            yield
        except RequestError:
            self.abandon_probe(is_probe)
            raise
        except Exception:
            self.record_failure()
            raise
        except BaseException:  # cancelled, or the stream it serves was closed
            self.abandon_probe(is_probe)
            raise
        else:
            self.record_success()
        finally:
            self.release()

    async def open_stream(self, prompt: Prompt, params: GenerationParams,
                          deadline: float | None = None) -> BackendStream:
        """Start a stream and wait for its first chunk (within ``timeout_s`` and before
        ``deadline``).

        Raises before any byte is sent when the backend fails or times out, so the caller
        can still fall back. The returned stream yields the first chunk, then the rest.
        """
        stream = BackendStream(self, await self.acquire(deadline))
        stream.start(prompt, params)
        try:
            first = await stream.next_chunk(max(0.0, self._budget(self.limits.timeout_s, deadline)))
        except (RequestError, asyncio.CancelledError):  # the request's fault, or the client left
            self.abandon_probe(stream.is_probe)
            await stream.aclose()
            raise
        except BaseException:
            self.record_failure()
            await stream.aclose()
            raise
        stream.first = first
        if stream.is_probe:  # a first chunk is the verdict: the backend serves again
            self.record_success()
        return stream


_DONE = object()


class BackendStream:
    """Chunks pumped from ``backend.astream`` by a task into a queue, so that waits time out
    cleanly and an abandoned stream is cancelled without blocking the caller."""

    def __init__(self, slot: BackendSlot, is_probe: bool = False) -> None:
        self.slot = slot
        self.is_probe = is_probe  # the breaker's probe: its first chunk is the verdict
        self.first: StreamChunk | None = None
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self, prompt: Prompt, params: GenerationParams) -> None:
        self._task = asyncio.ensure_future(self._pump(prompt, params))
        self._task.add_done_callback(lambda _t: self.slot.release())

    async def _pump(self, prompt: Prompt, params: GenerationParams) -> None:
        try:
            async for chunk in self.slot.backend.astream(prompt, params):
                self._queue.put_nowait(chunk)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait(as_backend_error(self.slot.name, exc))
        finally:
            self._queue.put_nowait(_DONE)

    async def next_chunk(self, timeout: float | None = None) -> StreamChunk | None:
        """The next chunk, None at the end; raises the backend's error or TimeoutError
        (nothing within ``timeout``, default the slot's ``timeout_s``)."""
        wait = self.slot.limits.timeout_s if timeout is None else timeout
        try:
            async with asyncio.timeout(wait):  # (see acquire: no wait_for)
                item = await self._queue.get()
        except TimeoutError:
            raise TimeoutError(f"{self.slot.name} sent nothing for {wait:g} s") from None
        if item is _DONE:
            return None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, StreamChunk)
        return item

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        """The chunks; the breaker hears how the stream ended: a success when the backend
        finished it, a failure when it broke or went silent. A consumer that stops early
        (a client that left) tells the breaker nothing."""
        try:
            if self.first is not None:
                first, self.first = self.first, None
                yield first
            while (chunk := await self.next_chunk()) is not None:
                yield chunk
        except Exception:
            self.slot.record_failure()
            raise
        self.slot.record_success()

    async def aclose(self) -> None:
        """Stop pumping (an in-process backend finishes its thread in the background)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            if _native_async(self.slot.backend):
                with contextlib.suppress(BaseException):
                    await self._task
