"""The router app: ``create_app(settings)`` builds a FastAPI app whose lifespan loads the
backends and policies; all state lives in ``app.state``. Beside it, the guard middleware
(API keys, body size) every request passes first.

Routes, one module per endpoint family (:mod:`router.api`): ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /v1/route``, ``GET /v1/models``, ``POST /v1/feedback``
(outcomes, :mod:`router.learning.feedback`), ``POST /admin/reload`` (a new classifier
artifact without a restart, :mod:`router.reload`; also on SIGHUP), ``GET /health``
(liveness), ``GET /ready`` (a backend can serve), ``GET /metrics``.
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

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models import registry
from models.base import Backend
from router import api, errors
from router.api.deps import T0_KEY
from router.decision_log import DecisionLog
from router.json_body import json_content_type
from router.learning import feedback as F
from router.learning.feedback import FeedbackService
from router.metrics import RouterMetrics
from router.policies import get_policy
from router.pool import BackendSlot, SlotLimits
from router.reload import Reloader
from router.serving import RouterService, probe_backends
from router.settings import BackendSettings, Settings, SettingsError
from router.span import SpanService

log = logging.getLogger(__name__)



def limits(settings: Settings, bs: BackendSettings) -> SlotLimits:
    return SlotLimits(timeout_s=bs.timeout_s, max_concurrency=bs.concurrency,
                      max_queue=bs.max_queue, queue_timeout_s=bs.queue_timeout_s,
                      failure_threshold=settings.failure_threshold,
                      cooldown_s=settings.cooldown_s)


PROTECTED = ("/v1/",)  # paths behind the client API keys
ADMIN = "/admin/"  # paths behind the admin API keys (GuardMiddleware.admin_refusal)


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


def bearer(headers: dict[bytes, bytes]) -> bytes:
    auth = headers.get(b"authorization", b"")
    return auth[7:].strip() if auth[:7].lower() == b"bearer " else b""


class StartupErrors:
    """A settings error found at start (a span profile this pair cannot serve,
    :func:`router.span.check_span_profiles`) is one line in the server's log, not the
    traceback Starlette sends with ``lifespan.startup.failed``; the server then exits non-zero
    as on any failed start (uvicorn: status 3)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        failed: list[Message] = []

        async def held_back(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                failed.append(message)  # sent below, once the exception is known
                return
            await send(message)

        try:
            await self.app(scope, receive, held_back)
        except BaseException as exc:
            if failed:
                msg = str(exc) if isinstance(exc, SettingsError) else failed[0].get("message")
                await send({**failed[0], "message": msg})
            raise
        if failed:  # failed without raising (not Starlette's way): pass it on as it was
            await send(failed[0])


class GuardMiddleware:
    """Client API keys on ``/v1/*`` (401), admin API keys on ``/admin/*`` (401 / 403, see
    :meth:`admin_refusal`) and the request body limit (413), before any parsing. Also stamps
    the request's arrival time for the overhead measurement."""

    def __init__(self, app: ASGIApp, api_keys: list[str], max_body_bytes: int,
                 admin_keys: list[str] | None = None) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.admin_keys = [k.encode() for k in admin_keys or ()]
        self.max_body = max_body_bytes

    def admin_refusal(self, scope: Scope, token: bytes) -> errors.APIError | None:
        """Why an ``/admin/*`` request is refused, or None. Admin keys configured: one of
        them (a client key is a 403, anything else a 401). Client keys but no admin keys:
        403 (admin endpoints are off until admin keys are set). Neither (local dev):
        loopback clients only (else 403)."""
        if self.admin_keys:
            if any(hmac.compare_digest(token, k) for k in self.admin_keys):
                return None
            if token and any(hmac.compare_digest(token, k) for k in self.keys):
                return errors.PermissionDeniedError(
                    "admin endpoints take an admin API key (admin_api_keys), not a client "
                    "API key")
            return errors.AuthenticationError("missing admin API key" if not token
                                              else "invalid admin API key")
        if self.keys:
            return errors.PermissionDeniedError(
                "admin endpoints are off: client api_keys are configured but no "
                "admin_api_keys; set admin_api_keys (ARCHROUTE_ADMIN_API_KEYS=k1,k2) to use "
                "them")
        client = scope.get("client")
        if not is_loopback(client[0] if client else None):
            return errors.PermissionDeniedError(
                "admin endpoints: with no API keys configured, only loopback clients may use "
                "them; set admin_api_keys to use them from elsewhere")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[T0_KEY] = time.perf_counter()
        json_content_type(scope)  # curl -d sends a form's content type: read JSON as JSON
        headers = dict(scope["headers"])
        if scope["path"].startswith(ADMIN):
            refused = self.admin_refusal(scope, bearer(headers))
            if refused is not None:
                return await errors.error_response(refused)(scope, receive, send)
        elif self.keys and scope["path"].startswith(PROTECTED):
            token = bearer(headers)
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


def create_app(settings: Settings, backends: Mapping[str, Backend] | None = None,
               span_service: type[SpanService] | None = None) -> FastAPI:
    """The router app. ``backends`` (role -> Backend) replaces building them from settings
    (tests inject fakes this way); ``span_service`` builds the span slots (None:
    :class:`~router.span.SpanService`; a subclass may build them over other backends, e.g. a
    Ray Serve deployment)."""

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
        for name, prof in settings.profiles.items():
            if prof.span_gate is not None:  # its slot is built with the service (router/span.py)
                log.info("profile %s: span decoding, gate %s", name, prof.span_gate)
                continue
            policies[name] = await asyncio.to_thread(get_policy, prof.policy, **prof.policy_args)
            thr = prof.threshold if prof.threshold is not None else policies[name].default_threshold()
            log.info("profile %s: %r threshold %.3f", name, policies[name], thr)
        dlog = open_decision_log(settings)
        try:
            make_span = span_service or SpanService
            span = make_span(slots, limits(settings, settings.backends["transformer"]),
                             tokenizers={role: bs.tokenizer
                                         for role, bs in settings.backends.items()})
            # a span profile this pair cannot serve: a SettingsError (StartupErrors: one line)
            app.state.service = await asyncio.to_thread(
                RouterService, settings, slots, policies, RouterMetrics(dlog), dlog, span)
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
            app.state.learner = learner = None
            if any(p.learns for p in settings.profiles.values()):  # the loop runs itself
                from router.learning.auto import AutoLearner, LearningCollector

                app.state.learner = learner = AutoLearner.from_settings(svc, reloader, settings)
                reloader.busy = learner.busy
                svc.metrics.watch(LearningCollector(learner))
                await learner.start()
            await probe_backends(svc)  # a warning per backend that cannot be reached
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
                if learner is not None:
                    await learner.stop()
                await app.state.feedback.stop()

    app = FastAPI(title="ArchRoute", lifespan=learning, docs_url=None, redoc_url=None)
    app.state.settings = settings
    errors.install(app)
    F.install(app)  # feedback's 429 / 503 carry Retry-After
    app.add_middleware(GuardMiddleware,  # type: ignore[arg-type]
                       api_keys=[k.get_secret_value() for k in settings.api_keys],
                       max_body_bytes=settings.max_body_bytes,
                       admin_keys=[k.get_secret_value() for k in settings.admin_api_keys])
    app.add_middleware(StartupErrors)  # type: ignore[arg-type]

    api.install(app)
    from router.ui import install_ui

    install_ui(app)
    errors.openapi_without_422(app)
    return app
