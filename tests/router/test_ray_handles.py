"""The handle backend's contract without a cluster: a stand-in for a Ray Serve deployment
handle (``.method.remote(...)`` gives an awaitable response; ``.options(stream=True)`` a
stream) that raises the exceptions Ray raises. A lost replica is retried, a stream only
before its first chunk; a replica's RequestError stays the client's fault; anything else is
a BackendError, and through a real BackendSlot the breaker counts it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from models.base import (
    BackendError,
    BackendInfo,
    GenerationParams,
    GenerationResult,
    RequestError,
    StreamChunk,
)
from router.pool import BackendSlot, SlotLimits

pytest.importorskip("ray", reason="the `ray` extra is not installed")
from ray.exceptions import ActorDiedError, RayTaskError  # noqa: E402

from router.rayserve.handles import BackendFacts, HandleBackend, SpanHandleBackend  # noqa: E402

FACTS = BackendFacts(BackendInfo("m", "transformer"), 128, True, False, True, 1)
RESULT = GenerationResult("ok", 3, 1, "stop")


def raised_in_replica(exc: Exception) -> Exception:
    """``exc`` as awaiting a deployment response raises it (Ray's dual-class error)."""
    return RayTaskError("generate", "Traceback: ...", exc).as_instanceof_cause()


class Response:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.cancelled = False

    def __await__(self):
        async def get():
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome
        return get().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class Stream:
    def __init__(self, chunks: list[Any]) -> None:
        self.chunks = chunks
        self.cancelled = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for c in self.chunks:
            if isinstance(c, BaseException):
                raise c
            yield c

    def cancel(self) -> None:
        self.cancelled = True


class Method:
    def __init__(self, handle: Handle, name: str, stream: bool) -> None:
        self.handle, self.name, self.stream = handle, name, stream

    def remote(self, *args: Any) -> Any:
        self.handle.calls.append((self.name, *args))
        outcome = self.handle.outcomes.pop(0)
        return Stream(outcome) if self.stream else Response(outcome)


class Handle:
    """Each call takes the next scripted outcome; ``calls`` records the arguments."""

    def __init__(self, outcomes: list[Any], stream: bool = False,
                 root: Handle | None = None) -> None:
        self.root = root or self
        self.outcomes = list(outcomes)
        self.calls: list[tuple] = []
        self.streaming = stream

    def options(self, stream: bool = False) -> Handle:
        return Handle([], stream, self.root)

    def __getattr__(self, name: str) -> Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return Method(self.root, name, self.streaming)


def run(coro):
    return asyncio.run(coro)


def test_a_lost_replica_is_retried_and_other_errors_are_translated() -> None:
    params = GenerationParams(max_tokens=4)
    h = Handle([ActorDiedError(), RESULT])
    b = HandleBackend("m", h, FACTS, replicas=2)
    assert b.max_concurrency == 2 and b.context_length == 128 and b.accepts_token_ids
    assert run(b.agenerate("hi", params)) == RESULT
    assert [c[0] for c in h.calls] == ["generate", "generate"]  # sent again

    b = HandleBackend("m", Handle([raised_in_replica(RequestError("too long: 9000 tokens"))]),
                      FACTS)
    with pytest.raises(RequestError) as err:
        run(b.agenerate("hi", params))
    assert str(err.value) == "too long: 9000 tokens"  # no Ray traceback for the client

    b = HandleBackend("m", Handle([raised_in_replica(KeyError("cuda"))]), FACTS)
    with pytest.raises(BackendError, match=r"m: replica error \(KeyError\)"):
        run(b.agenerate("hi", params))

    b = HandleBackend("m", Handle([ActorDiedError()] * 3), FACTS, retries=2)
    with pytest.raises(BackendError):
        run(b.agenerate("hi", params))


def test_a_stream_is_retried_only_before_its_first_chunk() -> None:
    params = GenerationParams(max_tokens=4)
    first, last = StreamChunk("a"), StreamChunk("b", "stop", 1, 2)

    async def collect(b: HandleBackend) -> list[str]:
        return [c.text async for c in b.astream("hi", params)]

    h = Handle([[ActorDiedError()], [first, last]])
    assert run(collect(HandleBackend("m", h, FACTS))) == ["a", "b"]
    h = Handle([[first, ActorDiedError()], [first, last]])
    with pytest.raises(BackendError):
        run(collect(HandleBackend("m", h, FACTS)))
    assert len(h.calls) == 1  # the client already has "a": not sent again


def test_facts_come_from_the_replica_backend() -> None:
    """What the router reads of a handle backend is what the replica's backend states; a
    prompt score goes to the replica (the prompt probe)."""
    from models.fake import FakeBackend

    fake = FakeBackend("f", "hybrid")
    facts = BackendFacts.of(fake)
    b = HandleBackend("f", Handle(["scored"]), facts, replicas=3)
    for attr in ("context_length", "can_score", "can_score_prompt", "can_call_tools",
                 "accepts_token_ids"):
        assert getattr(b, attr) == getattr(fake, attr), attr
    assert b.info() == fake.info() and b.max_concurrency == 3 * fake.max_concurrency
    assert run(b.ascore_prompt("hi")) == "scored"


def test_span_calls_name_the_gate_and_draft() -> None:
    h = Handle([RESULT])
    b = SpanHandleBackend("span:copy-2", h, FACTS, "copy-2", (8, 2))
    assert not b.can_score
    assert run(b.agenerate("hi", GenerationParams())) == RESULT
    assert h.calls[0][:3] == ("generate", "copy-2", (8, 2))
    with pytest.raises(RequestError):
        b.score("a", "b")


def test_the_slot_breaker_counts_replica_failures() -> None:
    h = Handle([raised_in_replica(RuntimeError("boom"))] * 2)
    slot = BackendSlot("transformer", HandleBackend("m", h, FACTS),
                       SlotLimits(failure_threshold=2, cooldown_s=60))
    for _ in range(2):
        with pytest.raises(BackendError):
            run(slot.generate("hi", GenerationParams()))
    assert slot.state == "open"
