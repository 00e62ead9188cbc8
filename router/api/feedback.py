"""``POST /v1/feedback`` and ``GET /v1/feedback/{id}``: outcomes of served responses
(:mod:`router.learning.feedback`, docs/learning-loop.md)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from router.api.deps import E
from router.learning.feedback import FeedbackRequest, client_key

router = APIRouter()


@router.post("/v1/feedback", responses=E(400, 401, 404, 409, 413, 429, 503))
async def feedback(body: FeedbackRequest, request: Request) -> dict:
    """An outcome for a served response: a reward in [-1, 1], thumbs up/down (+1/-1),
    or a reference answer to score under both backends (docs/learning-loop.md)."""
    return await request.app.state.feedback.submit(body, client_key(request))


@router.get("/v1/feedback/{response_id}", responses=E(401, 404, 503))
async def feedback_of(response_id: str, request: Request) -> dict:
    """The feedback and reference label stored for a response."""
    return await request.app.state.feedback.outcome(response_id)
