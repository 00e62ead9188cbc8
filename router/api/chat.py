"""``POST /v1/chat/completions``, ``POST /v1/completions`` (routed and served) and
``POST /v1/route`` (the decision only)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from router import errors
from router import protocol as P
from router.api.deps import E, service, t0

router = APIRouter()
GENERATING = {**E(400, 401, 404, 413, 429, 502, 503, 504), **errors.OPENAPI_STREAM}


@router.post("/v1/chat/completions", responses=GENERATING)
async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
    return await service(request).handle(body, t0(request))


@router.post("/v1/completions", responses=GENERATING)
async def completions(body: P.CompletionRequest, request: Request) -> Response:
    return await service(request).handle(body, t0(request))


# /v1/route's decision as headers, for gateways that route on headers (docs/router.md,
# "Kubernetes gateways"): the architecture (transformer | hybrid | span), the backend's name
ARCH_HEADER = "x-archroute-arch"
BACKEND_HEADER = "x-archroute-backend"


@router.post("/v1/route", responses=E(400, 401, 404, 413))
async def route_only(body: P.ChatCompletionRequest, request: Request,
                     response: Response) -> dict:
    """The routing decision for a chat request, without generating (for gateways that
    route with ArchRoute and call the backend themselves); the body's ``decision`` and
    ``backend`` also as the ``x-archroute-arch`` and ``x-archroute-backend`` headers."""
    try:
        out = await service(request).decide_only(body)
    except Exception as exc:  # noqa: BLE001 - one mapper makes the envelope
        raise errors.to_api_error(exc) from exc
    response.headers[ARCH_HEADER] = str(out["decision"])
    response.headers[BACKEND_HEADER] = str(out["backend"])
    return out
