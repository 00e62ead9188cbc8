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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from router import protocol as P
from router.errors import (
    APIError,
    ConflictError,
    InvalidRequestError,
    OverloadedError,
)

if TYPE_CHECKING:
    from models.base import ScoreResult
    from router.decision_log import DecisionLog
    from router.pool import BackendSlot
    from router.serving import RouterService

log = logging.getLogger(__name__)

THUMBS = {"up": 1.0, "down": -1.0}
_SPARE_POLL_S = 0.02  # how often scoring looks for spare backend capacity


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: the response ``id`` and exactly one of ``reward`` (a number in
    [-1, 1]), ``thumbs`` (``up`` = +1, ``down`` = -1) or ``reference`` (the answer text)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    reward: float | None = None
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


class FeedbackService:
    """Feedback for one router: validation, synchronous storage, and the reference-scoring
    queue with its one worker task."""

    def __init__(self, service: RouterService, queue_size: int = 64) -> None:
        self.service = service
        self.dlog: DecisionLog | None = service.decision_log
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(queue_size)
        self._worker: asyncio.Task | None = None
        self.scored = 0  # references scored by this process (tests, logs)

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        if self.dlog is None:
            return
        if self.dlog.log_prompts:  # references acknowledged before a restart
            for rid, ref in await asyncio.to_thread(self.dlog.queued_references,
                                                    self.queue.maxsize):
                self.queue.put_nowait((rid, ref))
        self._worker = asyncio.create_task(self._work(), name="feedback-scoring")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    # --- the endpoint ----------------------------------------------------------------
    def _log(self) -> DecisionLog:
        if self.dlog is None:
            raise InvalidRequestError("feedback is stored beside the decision it is about, and "
                                      "this router keeps no decision log: set decision_log "
                                      "(a SQLite path or a PostgreSQL URL) to accept feedback",
                                      code="feedback_unavailable")
        return self.dlog

    async def submit(self, body: FeedbackRequest) -> dict:
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
        if body.reference is not None and not dlog.log_prompts:
            raise InvalidRequestError(
                "reference: scoring a reference needs the request's prompt, and this router "
                "does not keep prompts: start it with log_prompts: true (--log-prompts)",
                param="reference", code="prompts_not_logged")
        row = await asyncio.to_thread(dlog.find, body.id)
        if row is None:
            raise ResponseNotFoundError(
                f"no response with id {body.id!r} in the decision log (an unknown id, a "
                "request that was not served, or one deleted after "
                "decision_log_retention_days)", param="id")
        if body.reference is not None:
            return await self._reference(dlog, body.id, body.reference, row)
        reward = body.reward if body.reward is not None else THUMBS[body.thumbs or "up"]
        kind = "reward" if body.reward is not None else "thumbs"
        status, stored = await asyncio.to_thread(dlog.add_feedback, body.id, reward, kind)
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
        status = await asyncio.to_thread(dlog.add_reference, rid, reference, sha)
        if status == "conflict":
            raise ConflictError(f"response {rid!r} already has a different reference; "
                                "feedback for a response is final", param="reference")
        if status == "new":
            try:
                self.queue.put_nowait((rid, reference))
            except asyncio.QueueFull:
                await asyncio.to_thread(dlog.drop_reference, rid)
                raise self._full() from None
        return {"object": "archroute.feedback", "id": rid, "reference": "queued",
                "duplicate": status == "duplicate"}

    def _full(self) -> FeedbackQueueFullError:
        return FeedbackQueueFullError(
            f"the queue of references waiting to be scored is full ({self.queue.maxsize}, "
            "feedback_queue_size); retry later", param="reference")

    async def outcome(self, rid: str) -> dict:
        """``GET /v1/feedback/{id}``: what is stored for a response."""
        dlog = self._log()
        if await asyncio.to_thread(dlog.find, rid, 0.0) is None:
            raise ResponseNotFoundError(f"no response with id {rid!r} in the decision log",
                                        param="id")
        out = await asyncio.to_thread(dlog.outcome, rid)
        return {"object": "archroute.feedback", "id": rid, **out}

    # --- scoring references, off the request path -------------------------------------
    async def _work(self) -> None:
        assert self.dlog is not None
        while True:
            rid, reference = await self.queue.get()
            try:
                fields = await self._score(rid, reference)
                await asyncio.to_thread(self.dlog.set_label, rid, "done", **fields)
                self.scored += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded on the label row
                log.warning("reference for %s not scored: %s: %s", rid, type(exc).__name__, exc)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.dlog.set_label, rid, "failed",
                                            error=f"{type(exc).__name__}: {exc}"[:500])
            finally:
                self.queue.task_done()

    async def _score(self, rid: str, reference: str) -> dict:
        from classifiers.labels import fit_to_context, gap_of, prompt_for

        assert self.dlog is not None
        row = await asyncio.to_thread(self.dlog.find, rid, 0.0)
        if row is None:
            raise LookupError("the decision is gone (retention)")
        req = label_request(rid, row, reference)
        t, h = self.service.slots["transformer"], self.service.slots["hybrid"]

        def pairs() -> tuple[tuple[str, str], tuple[str, str]]:
            (p1, a), (p2, _) = prompt_for(req, t.backend), prompt_for(req, h.backend)
            a1, _f1 = fit_to_context(t.backend, p1, a)
            a2, _f2 = fit_to_context(h.backend, p2, a)
            cut = a1 if len(a1) <= len(a2) else a2  # both score the same text
            return (p1, cut), (p2, cut)

        pt, ph = await asyncio.to_thread(pairs)
        st = await self._score_on(t, *pt)
        sh = await self._score_on(h, *ph)
        gap = gap_of(st, sh)
        if not math.isfinite(gap):
            raise ValueError("the reference has no tokens to score")
        return {"loss_transformer": st.loss, "loss_hybrid": sh.loss, "gap": gap,
                "n_tokens": len(st.logprobs), "pair": f"{t.name}|{h.name}"}

    async def _score_on(self, slot: BackendSlot, prompt: str, continuation: str) -> ScoreResult:
        """Score on a backend only with spare capacity: no request waiting for it, a free
        slot and its breaker closed; until then wait (requests go first). The call holds a
        slot like a request would, within the backend's ``timeout_s``."""
        while not (slot.state == "closed" and slot.waiting == 0
                   and slot.in_flight < slot.limits.max_concurrency):
            await asyncio.sleep(_SPARE_POLL_S)
        await slot.acquire()
        t0 = time.perf_counter()
        task = asyncio.ensure_future(slot.backend.ascore(prompt, continuation))
        task.add_done_callback(lambda _t: slot.release())
        try:
            return await asyncio.wait_for(asyncio.shield(task), slot.limits.timeout_s)
        finally:
            log.debug("scored a reference on %s in %.3f s", slot.name, time.perf_counter() - t0)


def label_request(rid: str, row: dict, reference: str):
    """The label request (``classifiers.labels``) for a logged decision and a reference: a
    chat request's conversation, or a completion's prompt."""
    from classifiers.realdata import RealRequest
    from classifiers.synthetic_mix import MixRequest
    from models.base import ChatMessage

    req = row.get("request")
    if isinstance(req, str):
        import json

        req = json.loads(req)
    if req and req.get("kind") == "chat":
        msgs = tuple(ChatMessage(m["role"], m["content"]) for m in req["messages"])
        return RealRequest(rid, "decision-log", "router", "chat", msgs, reference)
    prompt = req["messages"][0]["content"] if req else row["prompt"]
    return MixRequest(rid, "", "", "completion", "train", prompt, reference)
