"""``archroute serve-model``'s endpoints: ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models``, ``GET /health``, ``GET /ready``; they call the
:class:`router.model_server.ModelService` in ``app.state.model``."""

from __future__ import annotations

import time
from typing import Protocol

from fastapi import APIRouter, Request
from fastapi.responses import Response

from router import protocol as P
from router.pool import BackendSlot

router = APIRouter()


class ServedModel(Protocol):
    """What the endpoints call (:class:`router.model_server.ModelService`, which imports
    this module: a Protocol here keeps the import one way)."""

    @property
    def slot(self) -> BackendSlot: ...

    def card(self) -> dict: ...

    def ready(self) -> dict: ...

    async def serve(self, body: P.ChatCompletionRequest | P.CompletionRequest) -> Response: ...


def _model(request: Request) -> ServedModel:
    return request.app.state.model


@router.post("/v1/chat/completions")
async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
    return await _model(request).serve(body)


@router.post("/v1/completions")
async def completions(body: P.CompletionRequest, request: Request) -> Response:
    return await _model(request).serve(body)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    return {"object": "list", "data": [_model(request).card()]}


@router.get("/health")
async def health() -> dict:
    return {"status": "ok", "time": time.time()}


@router.get("/ready")
async def ready(request: Request) -> dict:
    return _model(request).ready()
