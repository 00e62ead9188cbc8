"""HTTP wiring of the router: ``create_app(settings)`` builds a FastAPI app whose lifespan
loads the backends and policies; all state lives in ``app.state``.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``POST /v1/feedback`` (outcomes, :mod:`router.feedback`), ``POST /admin/reload`` (a new
classifier artifact without a restart, :mod:`router.reload`; also on SIGHUP),
``GET /health`` (liveness), ``GET /ready`` (a backend can serve), ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models import registry
from models.base import Backend
from models.span.gates import get_gate
from router import errors
from router import feedback as F
from router import protocol as P
from router.decision_log import DecisionLog
from router.feedback import FeedbackRequest, FeedbackService
from router.metrics import RouterMetrics
from router.policies import get_policy
from router.pool import BackendSlot, SlotLimits
from router.reload import Reloader, ReloadRequest
from router.serving import RouterService, check_ready
from router.settings import BackendSettings, Settings
from router.span import SpanService

log = logging.getLogger(__name__)

T0_KEY = "archroute.t0"


def limits(settings: Settings, bs: BackendSettings) -> SlotLimits:
    return SlotLimits(timeout_s=bs.timeout_s, max_concurrency=bs.concurrency,
                      max_queue=bs.max_queue, queue_timeout_s=bs.queue_timeout_s,
                      failure_threshold=settings.failure_threshold,
                      cooldown_s=settings.cooldown_s)


PROTECTED = ("/v1/", "/admin/")  # paths behind the API keys


def open_decision_log(settings: Settings) -> DecisionLog | None:
    """The decision log the settings ask for (SQLite path or PostgreSQL URL), or None."""
    if not settings.decision_log:
        return None
    return DecisionLog(settings.decision_log, settings.log_prompts,
                       retention_days=settings.decision_log_retention_days,
                       max_buffered_rows=settings.decision_log_buffer_rows)


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GuardMiddleware:
    """API keys on ``/v1/*`` and ``/admin/*`` (401) and the request body limit (413), before
    any parsing. Also stamps the request's arrival time for the overhead measurement."""

    def __init__(self, app: ASGIApp, api_keys: list[str], max_body_bytes: int) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[T0_KEY] = time.perf_counter()
        headers = dict(scope["headers"])
        if self.keys and scope["path"].startswith(PROTECTED):
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not any(hmac.compare_digest(token, k) for k in self.keys):
                msg = "missing API key" if not token else "invalid API key"
                return await errors.error_response(errors.AuthenticationError(msg))(
                    scope, receive, send)
        length = headers.get(b"content-length")
        too_large = errors.RequestTooLargeError(
            f"request body exceeds {self.max_body} bytes")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await errors.error_response(too_large)(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:  # FastAPI passes HTTPException through body reading
                    raise StarletteHTTPException(413, too_large.message)
            return msg

        return await self.app(scope, limited, send)


def create_app(settings: Settings, backends: Mapping[str, Backend] | None = None) -> FastAPI:
    """The router app. ``backends`` (role -> Backend) replaces building them from settings
    (tests inject fakes this way)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("archroute settings: %s", json.dumps(settings.redacted()))
        built = dict(backends) if backends is not None else {}
        for role, bs in settings.backends.items():
            if role not in built:
                built[role] = await asyncio.to_thread(registry.build, bs, role,
                                                      settings.torch_threads)
                log.info("backend %s (%s): %s", bs.name, role, built[role].info())
        slots: dict[str, BackendSlot] = {role: BackendSlot(role, built[role], limits(settings, bs))
                 for role, bs in settings.backends.items()}
        policies = {}
        gates = {}  # span profiles' gates, loaded now so a gate that does not load fails here
        for name, prof in settings.profiles.items():
            if prof.span_gate is not None:
                gates[prof.span_gate] = await asyncio.to_thread(get_gate, prof.span_gate)
                log.info("profile %s: span decoding, gate %s", name, prof.span_gate)
                continue
            policies[name] = await asyncio.to_thread(get_policy, prof.policy, **prof.policy_args)
            thr = prof.threshold if prof.threshold is not None else policies[name].default_threshold()
            log.info("profile %s: %r threshold %.3f", name, policies[name], thr)
        dlog = open_decision_log(settings)
        span = SpanService(built["transformer"], built["hybrid"],
                           limits(settings, settings.backends["transformer"]), gates,
                           {role: bs.tokenizer for role, bs in settings.backends.items()})
        app.state.service = RouterService(settings, slots, policies, RouterMetrics(dlog), dlog,
                                          span=span)
        try:
            yield
        finally:
            for b in built.values():
                await b.aclose()
            if dlog is not None:
                dlog.close()

    @asynccontextmanager
    async def learning(app: FastAPI) -> AsyncIterator[None]:
        """Feedback's scoring worker and live reloads (SIGHUP too), once the service is up."""
        async with lifespan(app):
            svc: RouterService = app.state.service
            app.state.feedback = FeedbackService.from_settings(svc, settings)
            app.state.reloader = reloader = Reloader(svc, settings)
            await app.state.feedback.start()
            loop = asyncio.get_running_loop()
            hup = False
            try:  # the main thread of a real server; not under a test client's thread
                loop.add_signal_handler(signal.SIGHUP, reloader.reload_soon, None,
                                        "SIGHUP reload")
                hup = True
            except (NotImplementedError, RuntimeError, ValueError, AttributeError):
                pass
            try:
                yield
            finally:
                if hup:
                    loop.remove_signal_handler(signal.SIGHUP)
                await app.state.feedback.stop()

    app = FastAPI(title="ArchRoute", lifespan=learning, docs_url=None, redoc_url=None)
    app.state.settings = settings
    errors.install(app)
    F.install(app)  # feedback's 429 / 503 carry Retry-After
    app.add_middleware(GuardMiddleware,  # type: ignore[arg-type]
                       api_keys=[k.get_secret_value() for k in settings.api_keys],
                       max_body_bytes=settings.max_body_bytes)

    def service(request: Request) -> RouterService:
        return request.app.state.service

    def t0(request: Request) -> float:
        return request.scope.get(T0_KEY, time.perf_counter())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        return await service(request).handle(body, t0(request))

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        return await service(request).handle(body, t0(request))

    @app.post("/v1/route")
    async def route_only(body: P.ChatCompletionRequest, request: Request) -> dict:
        """The routing decision for a chat request, without generating (for gateways that
        route with ArchRoute and call the backend themselves)."""
        try:
            return await service(request).decide_only(body)
        except Exception as exc:  # noqa: BLE001 - one mapper makes the envelope
            raise errors.to_api_error(exc) from exc

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        return {"object": "list", "data": service(request).models()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        for card in service(request).models():
            if card["id"] == model_id:
                return card
        raise errors.ModelNotFoundError(f"model {model_id!r} not found", param="model")

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request) -> dict:
        """An outcome for a served response: a reward in [-1, 1], thumbs up/down (+1/-1),
        or a reference answer to score under both backends (docs/learning-loop.md)."""
        return await request.app.state.feedback.submit(body, F.client_key(request))

    @app.get("/v1/feedback/{response_id}")
    async def feedback_of(response_id: str, request: Request) -> dict:
        """The feedback and reference label stored for a response."""
        return await request.app.state.feedback.outcome(response_id)

    @app.post("/admin/reload", include_in_schema=False)
    async def admin_reload(request: Request) -> dict:
        """Load a classifier artifact (``{"artifact": PATH}``; default: the shipped one) and
        swap it in without a restart. Behind the API keys; with none configured, loopback
        clients only."""
        if not settings.api_keys and not is_loopback(request.client.host if request.client
                                                      else None):
            raise errors.PermissionDeniedError(
                "/admin/reload: with no api_keys configured, only loopback clients may "
                "reload; configure api_keys to reload from elsewhere")
        raw = await request.body()
        try:
            data = json.loads(raw) if raw.strip() else {}
            body = ReloadRequest.model_validate(data if data is not None else {})
        except (ValueError, TypeError) as exc:
            raise errors.InvalidRequestError(f"/admin/reload: expected {{\"artifact\": "
                                             f"PATH}} or no body: {exc}") from None
        return await request.app.state.reloader.reload(body.artifact)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        ok, states = check_ready(service(request))
        return JSONResponse({"ready": ok, "backends": states}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        svc = service(request)
        for s in svc.slots.values():
            svc.metrics.in_flight.labels(s.name).set(s.in_flight)
            svc.metrics.breaker_open.labels(s.name).set(float(s.state == "open"))
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    from router.ui import install_ui

    install_ui(app)
    errors.openapi_without_422(app)
    return app
