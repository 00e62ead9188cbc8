"""Labels from references: a client's reference answer for a served request, scored under both
backends off the request path (``POST /v1/feedback``, :mod:`router.learning.feedback`), is the
label ``archroute label`` measures offline (:mod:`classifiers.training.labels`), for live traffic.

The request is rebuilt from its logged row as the one label-request type,
:class:`~classifiers.training.labels.LabelRequest` (a conversation, or a completion's plain prompt), and
scored through each backend's slot (:meth:`router.pool.BackendSlot.score`): the breaker and
timeout apply, and it waits for spare capacity, so a request never waits for a label.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from classifiers.training.labels import LabelRequest, gap_of, scoring_pairs
from models.base import Backend, ChatMessage, ScoreResult


class ScoringSlot(Protocol):
    """What scoring needs of a backend's slot (:class:`router.pool.BackendSlot`)."""

    @property
    def name(self) -> str: ...

    @property
    def backend(self) -> Backend: ...

    async def score(self, prompt: str, continuation: str, deadline: float | None = None,
                    spare_only: bool = False) -> ScoreResult: ...


def label_request(rid: str, row: dict, reference: str) -> LabelRequest:
    """The label request for a logged decision (``row``, with its request or prompt) and a
    reference: a chat request's conversation, or a completion's prompt."""
    req = row.get("request")
    if isinstance(req, str):
        req = json.loads(req)
    if req and req.get("kind") == "chat":
        msgs = [ChatMessage(m["role"], m["content"]) for m in req["messages"]]
        return LabelRequest.chat(rid, msgs, reference)
    prompt = req["messages"][0]["content"] if req else row["prompt"]
    return LabelRequest.completion(rid, prompt, reference)


async def measure(req: LabelRequest, transformer: ScoringSlot, hybrid: ScoringSlot,
                  run: Callable[..., Awaitable[Any]]) -> dict:
    """The label of ``req`` on the pair: the losses (nats/token), their gap
    (``loss_transformer - loss_hybrid``), the tokens scored and the pair's names. ``run(fn,
    *args)`` runs the tokenizer work (cutting the reference to fit) off the event loop;
    scoring waits for spare capacity on each backend."""
    (p1, a1), (p2, a2), _flags = await run(scoring_pairs, req, transformer.backend,
                                           hybrid.backend)
    st = await transformer.score(p1, a1, spare_only=True)
    sh = await hybrid.score(p2, a2, spare_only=True)
    gap = gap_of(st, sh)
    if not math.isfinite(gap):
        raise ValueError("the reference has no tokens to score")
    return {"loss_transformer": st.loss, "loss_hybrid": sh.loss, "gap": gap,
            "n_tokens": len(st.logprobs), "pair": f"{transformer.name}|{hybrid.name}"}
