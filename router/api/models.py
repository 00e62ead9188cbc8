"""``GET /v1/models`` and ``GET /v1/models/{id}``: the default alias, the profiles served, the
backends (:meth:`router.serving.RouterService.models`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from router.api.deps import E, service

router = APIRouter()


@router.get("/v1/models", responses=E(401))
async def models(request: Request) -> dict:
    return {"object": "list", "data": service(request).models()}


@router.get("/v1/models/{model_id:path}", responses=E(401, 404))
async def model(model_id: str, request: Request) -> dict:
    for card in service(request).models():
        if card["id"] == model_id:
            return card
    raise service(request).not_found(model_id)  # a built-in span profile left out: why
