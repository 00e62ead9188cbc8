"""Every error the servers return, in OpenAI's envelope, from one mapper.

``{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}``
with 400 invalid request, 401 auth, 403 not allowed, 404 unknown model (or response),
409 conflicting feedback, 413 too large, 429 / 503 overloaded, 502 upstream failure, 504
upstream timeout, 500 anything else.

What a client reads is ours: a backend's or an exception's own text (an upstream's error
body, a path, a library's message) is logged with the request id, never sent. Only
:class:`~models.base.RequestError` (and request validation) is the client's fault (400);
any other exception is a 500 ``internal_error``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.base import BackendError, RequestError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and OpenAI ``type`` / ``param`` / ``code``."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type


class InvalidRequestError(APIError):
    status, type = 400, "invalid_request_error"


class AuthenticationError(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class ModelNotFoundError(APIError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class PermissionDeniedError(APIError):
    status, type, code = 403, "permission_error", "forbidden"


class ConflictError(APIError):
    status, type, code = 409, "invalid_request_error", "conflict"


class RequestTooLargeError(APIError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class OverloadedError(APIError):
    """All slots and queue places of the backend are taken (429) or the wait ran out (503)."""

    status, type, code = 429, "rate_limit_error", "backend_overloaded"


class UnavailableError(APIError):
    status, type, code = 503, "service_unavailable", "backend_unavailable"


class UpstreamError(APIError):
    status, type, code = 502, "upstream_error", "backend_failed"


class UpstreamTimeout(APIError):
    status, type, code = 504, "upstream_error", "backend_timeout"


def _kind(exc: BaseException) -> str:
    """The kind of a backend failure, without its text: ``HTTP 500`` for an upstream's
    status, else the exception class (of the cause, for a wrapped one)."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return f"HTTP {status}"
    cause = exc.__cause__
    return type(cause if cause is not None and not isinstance(cause, APIError) else exc).__name__


def to_api_error(exc: BaseException, backend: str | None = None,
                 request_id: str | None = None) -> APIError:
    """Map any exception to the :class:`APIError` the client sees; ``backend`` (its name)
    and ``request_id`` go into the message and the log line. Text the client does not see
    is logged with the request id."""
    if isinstance(exc, APIError):
        return exc
    who = f"backend {backend}" if backend else "backend"
    rid = request_id or "-"
    if isinstance(exc, RequestError):  # the client's fault: too long, refused as invalid
        if isinstance(getattr(exc, "status_code", None), int):  # an upstream's words
            log.info("request %s: %s refused it: %s", rid, who, exc)
            return InvalidRequestError(f"upstream {who} refused the request "
                                       f"({_kind(exc)})")
        return InvalidRequestError(str(exc))
    # a backend's failures are logged where they happen (the fallback loop in
    # router/serving.py, with the request id; router/streaming.py mid-stream)
    if isinstance(exc, TimeoutError):  # incl. UpstreamTimeoutError, asyncio timeouts
        return UpstreamTimeout(f"{who} timed out")
    if isinstance(exc, BackendError):
        up = "upstream " if isinstance(getattr(exc, "status_code", None), int) else ""
        return UpstreamError(f"{up}{who} failed ({_kind(exc)})")
    log.error("request %s: unexpected error", rid, exc_info=exc)
    return APIError("internal error", status=500, type="server_error", code="internal_error")


def client_error(exc: ValueError) -> Exception:
    """A ValueError from a request's own checks (the methods of router/protocol.py's
    request models) as the client's fault: a 400. Only there; elsewhere a plain ValueError
    is a bug (500, :func:`to_api_error`)."""
    return exc if isinstance(exc, RequestError) else InvalidRequestError(str(exc))


def envelope(err: APIError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param,
                      "code": err.code}}


def error_response(exc: BaseException, headers: Mapping[str, str] | None = None) -> JSONResponse:
    err = to_api_error(exc)
    return JSONResponse(envelope(err), status_code=err.status, headers=headers)


def sse_error(exc: BaseException) -> str:
    """A mid-stream failure as one SSE event (the stream then ends with ``[DONE]``)."""
    return f"data: {json.dumps(envelope(to_api_error(exc)))}\n\n"


def install(app: FastAPI) -> None:
    """Route FastAPI's own errors (validation, 404, 405) through the same envelope."""

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        msg = first.get("msg", "invalid request")
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            msg = f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            param = None
        text = f"{param}: {msg}" if param else msg
        if len(errs) > 1:
            text += f" (and {len(errs) - 1} more)"
        return error_response(InvalidRequestError(text, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return error_response(RequestTooLargeError(str(exc.detail)))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(str(exc.detail), status=exc.status_code, code=code),
                              headers=exc.headers)  # a 405's Allow

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """OpenAI's error envelope: every error the router answers has this body."""

    error: ErrorObject


ERROR_MEANINGS = {
    400: "invalid request", 401: "missing or invalid API key",
    403: "not allowed (e.g. admin endpoints without an admin key)",
    404: "unknown model or response id", 409: "conflicting feedback",
    413: "request body over max_body_bytes", 429: "overloaded: no free slot or queue place",
    502: "the backend failed", 503: "unavailable: backend cooling down, no slot in time",
    504: "the backend timed out",
}
# a generating route's 200: JSON, or with ``stream: true`` server-sent events
OPENAPI_STREAM: dict[int | str, dict] = {200: {
    "description": "the completion (JSON); with `stream: true`, server-sent events "
                   "(`data: {chunk}` lines, an error as one `data: {\"error\": ...}` event, "
                   "always ending with `data: [DONE]`)",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def openapi_errors(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` for a route: each status with the error envelope's schema."""
    return {s: {"model": ErrorEnvelope, "description": f"{ERROR_MEANINGS[s]} (OpenAI's "
                "error envelope)"} for s in statuses}


def openapi_without_422(app) -> None:
    """Make ``/openapi.json`` say what the router sends: validation errors are 400 in
    OpenAI's envelope (:func:`install`), never FastAPI's 422."""
    from fastapi.openapi.utils import get_openapi

    def build() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    responses = op.get("responses", {})
                    # a body or a query can fail validation (a 400); a str path parameter not
                    checked = "requestBody" in op or any(
                        p.get("in") != "path" for p in op.get("parameters", ()))
                    if responses.pop("422", None) is not None and checked:
                        responses.setdefault("400", {"description": "invalid request, in "
                                                     "OpenAI's error envelope"})
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build
