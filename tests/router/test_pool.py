"""Slots: bounded concurrency, timeouts that never pile up threads, the breaker."""

from __future__ import annotations

import asyncio

import pytest

from models.base import GenerationParams, RequestError
from models.fake import FakeBackend
from router.errors import OverloadedError, UnavailableError
from router.pool import BackendSlot, SlotLimits


def test_timeout_keeps_the_slot_until_the_thread_ends() -> None:
    async def main() -> None:
        slot = BackendSlot("t", FakeBackend(delay_s=0.4),
                           SlotLimits(timeout_s=0.1, max_concurrency=1, max_queue=0))
        with pytest.raises(TimeoutError):
            await slot.generate("x", GenerationParams())
        assert slot.in_flight == 1  # the forward pass still runs in its thread
        with pytest.raises(OverloadedError):
            await slot.generate("x", GenerationParams())
        await asyncio.sleep(0.5)
        assert slot.in_flight == 0
        with pytest.raises(TimeoutError):  # streams too: nothing within timeout_s
            await slot.open_stream("x", GenerationParams())

    asyncio.run(main())


def test_queue_wait_runs_out_503() -> None:
    async def main() -> None:
        slot = BackendSlot("t", FakeBackend(delay_s=0.3),
                           SlotLimits(max_concurrency=1, max_queue=1, queue_timeout_s=0.05))
        first = asyncio.ensure_future(slot.generate("x", GenerationParams()))
        await asyncio.sleep(0.01)
        with pytest.raises(UnavailableError):
            await slot.generate("x", GenerationParams())
        await first

    asyncio.run(main())


def test_breaker_opens_probes_and_reopens() -> None:
    async def main() -> None:
        fake = FakeBackend()
        slot = BackendSlot("t", fake, SlotLimits(failure_threshold=2, cooldown_s=0.05))
        fake.fail(3)
        for _ in range(2):
            with pytest.raises(Exception, match="scripted"):
                await slot.generate("x", GenerationParams())
        assert slot.state == "open"
        with pytest.raises(UnavailableError):
            await slot.generate("x", GenerationParams())
        await asyncio.sleep(0.06)
        assert slot.state == "half-open"
        with pytest.raises(Exception, match="scripted"):  # the probe fails: open again
            await slot.generate("x", GenerationParams())
        assert slot.state == "open"
        await asyncio.sleep(0.06)
        await slot.generate("x", GenerationParams())  # the probe succeeds
        assert slot.state == "closed" and slot.failures == 0

    asyncio.run(main())


class _Picky(FakeBackend):
    """Refuses prompts that contain "too long" the way a backend refuses a request that does
    not fit its context (a ValueError: the request's fault), and fails while ``broken``."""

    broken = False

    def generate(self, prompt, params):
        if "too long" in str(prompt):
            raise RequestError("prompt exceeds the context")
        return super().generate(prompt, params)

    def stream(self, prompt, params):
        if "too long" in str(prompt):
            raise RequestError("prompt exceeds the context")
        yield from super().stream(prompt, params)


async def _open_breaker(slot: BackendSlot, fake: FakeBackend) -> None:
    fake.fail(slot.limits.failure_threshold)
    for _ in range(slot.limits.failure_threshold):
        with pytest.raises(Exception, match="scripted"):
            await slot.generate("x", GenerationParams())
    assert slot.state == "open"
    await asyncio.sleep(slot.limits.cooldown_s + 0.01)
    assert slot.state == "half-open"


@pytest.mark.parametrize("how", ["generate", "stream"])
def test_a_probe_that_is_the_requests_fault_hands_the_probe_on(how: str) -> None:
    """The probe after a cool-down is refused as the request's fault (too long for the
    context): no verdict on the backend, so the next request probes and closes the breaker.
    Before the fix the probing flag stayed set and the backend stayed open until restart."""
    async def main() -> None:
        fake = _Picky()
        slot = BackendSlot("t", fake, SlotLimits(failure_threshold=2, cooldown_s=0.05))
        await _open_breaker(slot, fake)
        with pytest.raises(RequestError):
            if how == "generate":
                await slot.generate("this is too long", GenerationParams())
            else:
                await slot.open_stream("this is too long", GenerationParams())
        assert slot.state == "half-open"  # not 'open' forever
        await slot.generate("fine", GenerationParams())
        assert slot.state == "closed"

    asyncio.run(main())


def test_a_probe_whose_client_leaves_hands_the_probe_on() -> None:
    async def main() -> None:
        fake = FakeBackend(delay_s=0.2)
        slot = BackendSlot("t", fake, SlotLimits(failure_threshold=1, cooldown_s=0.05,
                                                 max_concurrency=2))
        await _open_breaker(slot, fake)
        probe = asyncio.ensure_future(slot.generate("x", GenerationParams()))
        await asyncio.sleep(0.05)
        assert slot.probing
        probe.cancel()  # the client disconnects while the probe runs
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert slot.state == "half-open"
        await slot.generate("x", GenerationParams())
        assert slot.state == "closed"

    asyncio.run(main())


def test_a_streamed_probes_first_chunk_closes_the_breaker_even_if_the_client_leaves() -> None:
    """A stream's first chunk is the probe's verdict: the breaker closes at once, so a client
    that then leaves mid-stream (or a server that never notices it left) cannot keep the
    backend out of service."""
    from router.streaming import sse_events

    async def main() -> None:
        fake = FakeBackend(default_reply="one two three four five six")
        slot = BackendSlot("t", fake, SlotLimits(failure_threshold=1, cooldown_s=0.05))
        await _open_breaker(slot, fake)
        stream = await slot.open_stream("x", GenerationParams())
        assert stream.is_probe and slot.state == "closed"
        events = sse_events(stream, rid="r", model="m", chat=True)
        await events.__anext__()
        await events.aclose()  # the client went away after the first event
        assert slot.state == "closed"
        await slot.generate("x", GenerationParams())
        assert slot.state == "closed"

    asyncio.run(main())


def test_an_unanswered_probe_stops_blocking_after_timeout() -> None:
    """Whatever happens to a probe, the breaker does not stay open past the probe's own
    deadline: a healthy backend is back within one cool-down plus one timeout."""
    async def main() -> None:
        fake = FakeBackend()
        slot = BackendSlot("t", fake, SlotLimits(failure_threshold=1, cooldown_s=0.05,
                                                 timeout_s=0.1))
        await _open_breaker(slot, fake)
        assert await slot.acquire()  # a probe that never reports back (a lost task)
        slot.release()
        assert slot.state == "open"
        await asyncio.sleep(0.11)
        assert slot.state == "half-open"

    asyncio.run(main())


class _BreaksMidStream(FakeBackend):
    """Sends one chunk, then fails: the stream starts (the first chunk is in) and breaks."""

    async def astream(self, prompt, params):  # type: ignore[override]
        from models.base import BackendError, StreamChunk

        yield StreamChunk("part")
        raise BackendError("scripted mid-stream failure")


def test_the_stream_itself_tells_the_breaker_how_it_ended() -> None:
    """Breaker bookkeeping lives in the pool: iterating a BackendStream to its end records
    a success, a stream that breaks records a failure, with no formatter involved (the SSE
    formatter used to do both)."""
    async def main() -> None:
        slot = BackendSlot("t", _BreaksMidStream(), SlotLimits(failure_threshold=5))
        stream = await slot.open_stream("x", GenerationParams())
        with pytest.raises(Exception, match="scripted mid-stream"):
            async for _ in stream:
                pass
        await stream.aclose()
        assert slot.failures == 1
        ok = BackendSlot("t", FakeBackend(), SlotLimits(failure_threshold=5))
        ok.failures = 2
        stream = await ok.open_stream("x", GenerationParams())
        assert "".join([c.text async for c in stream])
        await stream.aclose()
        assert ok.failures == 0

    asyncio.run(main())


def test_held_is_a_call_the_caller_makes_itself() -> None:
    """``held()`` (a span's request to an engine): admitted like a call, the breaker told
    how the block ended: a failure on an exception, a success otherwise; no verdict on a
    RequestError or when the caller stops; the slot always released."""
    async def main() -> None:
        slot = BackendSlot("t", FakeBackend(), SlotLimits(max_concurrency=1, max_queue=0,
                                                          failure_threshold=2, cooldown_s=0.05))
        async with slot.held():
            assert slot.in_flight == 1
            with pytest.raises(OverloadedError):  # its limit holds for other calls
                await slot.generate("x", GenerationParams())
        assert (slot.in_flight, slot.failures) == (0, 0)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                async with slot.held():
                    raise ConnectionError("reset")
        assert (slot.state, slot.in_flight) == ("open", 0)
        with pytest.raises(UnavailableError):
            async with slot.held():
                pass
        await asyncio.sleep(0.06)
        with pytest.raises(RequestError):  # the probe ends with no verdict: still half-open
            async with slot.held():
                raise RequestError("too long")
        assert slot.state == "half-open"

        async def stopped() -> None:
            async with slot.held():
                await asyncio.sleep(10)

        task = asyncio.ensure_future(stopped())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (slot.state, slot.in_flight, slot.probing) == ("half-open", 0, False)
        async with slot.held():  # the next probe succeeds: closed
            pass
        assert (slot.state, slot.failures) == ("closed", 0)

    asyncio.run(main())
