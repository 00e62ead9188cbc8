"""Backends whose calls go through Ray Serve deployment handles: what a router replica
holds in place of an in-process model (:class:`HandleBackend`) or of the span decoder over
an in-process pair (:class:`SpanHandleBackend`).

They are ordinary :class:`~models.base.Backend` objects, so the router's
:class:`~router.pool.BackendSlot` (limits, queue, breaker, deadline), fallback and decision
log work on them unchanged. The handle spreads calls over the deployment's replicas (Ray
Serve's power-of-two-choices router); no HTTP between the router and the models.

Errors come back as the router expects them: the replica's :class:`RequestError` (the
client's fault: 400, no fallback) stays one, any other exception becomes a
:class:`BackendError` (502, fallback, breaker). A replica that dies before it answered (a
crash, SIGKILL, a node lost) costs no failed request: the call is sent again, to a replica
that lives, up to ``retries`` times; a stream is retried only before its first chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from models.base import (
    Backend,
    BackendError,
    BackendInfo,
    GenerationParams,
    GenerationResult,
    Prompt,
    PromptScore,
    RequestError,
    ScoreResult,
    StreamChunk,
)

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 3  # a call sent again after this many replicas died under it: a 502


@dataclass(frozen=True)
class BackendFacts:
    """What a model replica states about its backend (``ModelReplica.facts``): the
    :class:`Backend` capabilities the router reads, so the handle backend can state them."""

    info: BackendInfo
    context_length: int | None
    can_score: bool
    can_call_tools: bool
    accepts_token_ids: bool
    max_concurrency: int
    can_score_prompt: bool = False

    @classmethod
    def of(cls, backend: Backend) -> BackendFacts:
        return cls(backend.info(), backend.context_length, backend.can_score,
                   backend.can_call_tools, backend.accepts_token_ids, backend.max_concurrency,
                   backend.can_score_prompt)


def replica_lost(exc: BaseException) -> bool:
    """True when ``exc`` says the replica went away (its actor died or cannot be reached),
    not that the call failed in it: then the call may be sent again."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(exc, (RayActorError, ReplicaUnavailableError))


def as_router_error(name: str, exc: BaseException) -> BaseException:
    """A replica's exception as the router reads it: its :class:`RequestError` or
    :class:`BackendError` with the message it had, anything else a :class:`BackendError`
    naming its type (its text, with the replica's traceback, goes to the log)."""
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, RequestError):
        return RequestError(str(cause.args[0]) if cause.args else str(cause))
    if isinstance(cause, BackendError):
        return BackendError(str(cause.args[0]) if cause.args else str(cause))
    if isinstance(cause, (TimeoutError, asyncio.CancelledError)):
        return cause
    log.warning("%s: replica error %s: %s", name, type(cause).__name__, cause)
    err = BackendError(f"{name}: replica error ({type(cause).__name__})")
    err.__cause__ = exc
    return err


class HandleBackend(Backend):
    """A backend served by a Ray Serve deployment of :class:`~router.rayserve.deployments.
    ModelReplica` replicas. ``facts``: what one replica said of its backend;
    ``replicas``: how many there are (the router runs ``replicas`` times the backend's
    concurrency at once through this one slot); ``status``: a callable that says why the
    deployment cannot serve now, or None (``aprobe``)."""

    def __init__(self, name: str, handle: Any, facts: BackendFacts, replicas: int = 1,
                 status: Callable[[], str | None] | None = None,
                 retries: int = DEFAULT_RETRIES) -> None:
        super().__init__(name, facts.max_concurrency * replicas)
        self.handle = handle
        self.facts = facts
        self.context_length = facts.context_length
        self.can_score = facts.can_score
        self.can_score_prompt = facts.can_score_prompt
        self.can_call_tools = facts.can_call_tools
        self.accepts_token_ids = facts.accepts_token_ids
        self.retries = retries
        self._status = status
        self.prefix: tuple[Any, ...] = ()  # arguments every call starts with (the span gate)

    def info(self) -> BackendInfo:
        return self.facts.info

    # the router calls the async forms; the sync ones (CLI tools, tests) wait on the handle
    def generate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        return self._sync("generate", *self.prefix, prompt, params)

    def score(self, prompt: str, continuation: str) -> ScoreResult:
        return self._sync("score", prompt, continuation)

    def score_prompt(self, prompt: Prompt) -> PromptScore:
        return self._sync("score_prompt", prompt)

    def stream(self, prompt: Prompt, params: GenerationParams) -> Iterator[StreamChunk]:
        yield from self._sync_stream(*self.prefix, prompt, params)

    async def agenerate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        return await self._call("generate", *self.prefix, prompt, params)

    async def ascore(self, prompt: str, continuation: str) -> ScoreResult:
        return await self._call("score", prompt, continuation)

    async def ascore_prompt(self, prompt: Prompt) -> PromptScore:
        return await self._call("score_prompt", prompt)

    async def astream(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        async for chunk in self._stream("stream", *self.prefix, prompt, params):
            yield chunk

    async def aprobe(self) -> str | None:
        if self._status is None:
            return None
        return await asyncio.to_thread(self._status)

    # --- the calls -------------------------------------------------------------------
    async def _call(self, method: str, *args: Any) -> Any:
        """``handle.METHOD.remote(*args)``, sent again while replicas die under it; a
        cancelled call (the slot's deadline, a client gone) cancels the replica's work."""
        for attempt in range(self.retries + 1):
            response = getattr(self.handle, method).remote(*args)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - translated below
                if replica_lost(exc) and attempt < self.retries:
                    log.warning("%s: a replica was lost during %s (%s); sending it again",
                                self.name, method, type(exc).__name__)
                    continue
                raise as_router_error(self.name, exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        """A streaming call; sent again only while no chunk has arrived (after one, the
        client has bytes, and the router's own rules for a broken stream apply)."""
        for attempt in range(self.retries + 1):
            gen = getattr(self.handle.options(stream=True), method).remote(*args)
            started = False
            try:
                async for chunk in gen:
                    started = True
                    yield chunk
                return
            except (asyncio.CancelledError, GeneratorExit):
                gen.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - translated below
                if replica_lost(exc) and not started and attempt < self.retries:
                    log.warning("%s: a replica was lost before its stream began (%s); "
                                "sending it again", self.name, type(exc).__name__)
                    continue
                raise as_router_error(self.name, exc) from None

    def _sync(self, method: str, *args: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return getattr(self.handle, method).remote(*args).result()
            except Exception as exc:  # noqa: BLE001 - translated below
                if replica_lost(exc) and attempt < self.retries:
                    continue
                raise as_router_error(self.name, exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _sync_stream(self, *args: Any) -> Iterator[StreamChunk]:
        try:
            yield from self.handle.options(stream=True).stream.remote(*args)
        except Exception as exc:  # noqa: BLE001 - translated below
            raise as_router_error(self.name, exc) from None


class SpanHandleBackend(HandleBackend):
    """The span decoder of one gate and draft setting, served by the span deployment
    (:class:`~router.rayserve.deployments.SpanReplica`: both models of the pair in each
    replica, so the catch-up between them stays in-process and cheap). Each call names the
    gate and the draft setting; it cannot score."""

    def __init__(self, name: str, handle: Any, facts: BackendFacts, gate: str,
                 draft: tuple[int, int], replicas: int = 1,
                 status: Callable[[], str | None] | None = None,
                 retries: int = DEFAULT_RETRIES) -> None:
        super().__init__(name, handle, facts, replicas, status, retries)
        self.gate = gate
        self.draft = draft
        self.prefix = (gate, draft)
        self.can_score = False

    def score(self, prompt: str, continuation: str) -> ScoreResult:
        raise RequestError(f"{self.name}: span decoding does not score (score with a single "
                           "backend)")

    async def ascore(self, prompt: str, continuation: str) -> ScoreResult:
        return self.score(prompt, continuation)

    def score_prompt(self, prompt: Prompt) -> PromptScore:
        raise RequestError(f"{self.name}: span decoding does not score prompts")

    async def ascore_prompt(self, prompt: Prompt) -> PromptScore:
        return self.score_prompt(prompt)
