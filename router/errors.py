"""Every error the servers return, in OpenAI's envelope, from one mapper.

``{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}``
with 400 invalid request, 401 auth, 403 not allowed, 404 unknown model (or response),
409 conflicting feedback, 413 too large, 429 / 503 overloaded, 502 upstream failure, 504
upstream timeout, 500 anything else.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.base import BackendError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and OpenAI ``type`` / ``param`` / ``code``."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


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


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the :class:`APIError` the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TimeoutError):  # incl. UpstreamTimeoutError, asyncio timeouts
        return UpstreamTimeout(f"backend timed out: {exc}" if str(exc) else "backend timed out")
    # RequestError: a backend says the request is wrong (too long for the model, refused by
    # an upstream as invalid); a plain ValueError here comes from the router's own request
    # checks (a backend's stray ValueError was made a BackendError by the pool)
    if isinstance(exc, ValueError):
        return InvalidRequestError(str(exc))
    if isinstance(exc, BackendError):
        return UpstreamError(f"backend failed: {exc}")
    log.exception("unexpected error", exc_info=exc)
    return APIError("internal error", status=500, code="internal_error")


def envelope(err: APIError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param,
                      "code": err.code}}


def error_response(exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
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
        return error_response(APIError(str(exc.detail), status=exc.status_code, code=code))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)


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
                    if responses.pop("422", None) is not None:
                        responses.setdefault("400", {"description": "invalid request, in "
                                                     "OpenAI's error envelope"})
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build
