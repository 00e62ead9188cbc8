"""``GET /health`` (liveness), ``GET /ready`` (a backend can serve: 503 when none) and
``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from router.api.deps import service
from router.serving import check_ready

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    ok, states = await check_ready(service(request))
    return JSONResponse({"ready": ok, "backends": states}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    svc = service(request)
    for s in [*svc.slots.values(), *svc.span.slots.values()]:  # span slots too
        svc.metrics.in_flight.labels(s.name).set(s.in_flight)
        svc.metrics.breaker_open.labels(s.name).set(float(s.state == "open"))
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)
