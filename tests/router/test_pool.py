"""Slots: bounded concurrency, timeouts that never pile up threads, the breaker."""

from __future__ import annotations

import asyncio

import pytest

from models.base import GenerationParams
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
