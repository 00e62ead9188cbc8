"""What the endpoints read from a request: the router's service (``app.state``) and when the
request arrived (set by :class:`router.app.GuardMiddleware`)."""

from __future__ import annotations

import time

from fastapi import Request

from router import errors
from router.serving import RouterService

T0_KEY = "archroute.t0"  # the scope key GuardMiddleware stores the arrival time under
E = errors.openapi_errors  # the error responses each route declares (OpenAPI)


def service(request: Request) -> RouterService:
    return request.app.state.service


def t0(request: Request) -> float:
    """When the request arrived (``time.perf_counter()``), for the overhead it reports."""
    return request.scope.get(T0_KEY, time.perf_counter())
