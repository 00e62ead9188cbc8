"""The router as Ray Serve's ingress deployment: each replica runs the same FastAPI app as
``archroute serve`` (:func:`router.app.create_app`), its in-process backends replaced by
:class:`~router.rayserve.handles.HandleBackend` objects over the model deployments, its span
slots by :class:`~router.rayserve.handles.SpanHandleBackend` objects over the span
deployment. Upstream backends are built by the app itself, as in one process (HTTP).

A router replica counts a deployment of N replicas as one backend of N times the backend's
concurrency (its slot's ``max_concurrency``); each replica has its own breakers, queue and
metrics, and writes the decision log the settings name (PostgreSQL, shared, for several
replicas). Responses carry ``x-archroute-replica``: which router replica answered (so
``/ready`` and ``/metrics`` scraped through the proxy say whose they are).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.pool import BackendSlot
from router.rayserve.handles import BackendFacts, HandleBackend, SpanHandleBackend
from router.rayserve.replicas import SpanKey, enter
from router.settings import Settings
from router.span import NO_DRAFT, PAIR, SPAN_ROLE, Draft, SpanService, SpanUnavailableError

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-archroute-replica"
_UNASKED = object()


def span_keys(settings: Settings) -> list[SpanKey]:
    """The (gate, draft) of every span profile: the span decoders built at start."""
    out: list[SpanKey] = []
    for prof in settings.profiles.values():
        if prof.span_gate is not None:
            key = (prof.span_gate, (int(prof.span_draft[0]), int(prof.span_draft[1])))
            if key not in out:
                out.append(key)
    return out


class RaySpanService(SpanService):
    """Span slots over the span deployment: each (gate, draft) a slot whose backend calls
    the deployment's replicas. Whether the pair can span-decode is the replicas' answer
    (``SpanReplica.check``), asked at start for the profiles' settings (``answers``) and
    on first use for a gate a request names."""

    handle: Any = None
    answers: dict[SpanKey, tuple[str | None, BackendFacts | None]] = {}
    replicas: int = 1

    def _build(self, gate_name: str, draft: Draft = NO_DRAFT) -> BackendSlot:
        key = (gate_name, (int(draft[0]), int(draft[1])))
        found: Any = self.answers.get(key, _UNASKED)
        if found is _UNASKED:  # from prepare's worker thread, never the event loop
            found = self.handle.check.remote(*key).result()
            self.answers[key] = found
        why, facts = found
        if why is not None or facts is None:
            raise SpanUnavailableError(f"the span deployment's replicas cannot span-decode: "
                                       f"{why}", PAIR)
        backend = SpanHandleBackend(facts.info.name, self.handle, facts, key[0], key[1],
                                    replicas=self.replicas)
        return BackendSlot(SPAN_ROLE, backend,
                           replace(self.limits, max_concurrency=backend.max_concurrency))


def span_service_over(handle: Any, answers: dict, replicas: int) -> type[SpanService]:
    """A :class:`SpanService` class whose slots call ``handle`` (the span deployment)."""
    return type("BoundRaySpanService", (RaySpanService,),
                {"handle": handle, "answers": dict(answers), "replicas": replicas})


class ReplicaHeader:
    """ASGI middleware: ``x-archroute-replica: ID`` on every response of this replica."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.value = replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                msg["headers"] = [*msg.get("headers", []), (REPLICA_HEADER.encode(), self.value)]
            await send(msg)

        await self.app(scope, receive, tagged)


def replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests)
        return "local"


class RouterIngress:
    """One router replica. ``transformer``, ``hybrid``: the model deployments' handles
    (None for an upstream backend, which the app builds itself); ``span``: the span
    deployment's handle (None: no span deployment, span profiles answer as on a pair that
    cannot span);
    ``status``: role -> a callable saying why that deployment cannot serve (``aprobe``)."""

    def __init__(self, settings: Settings, status: Any, cwd: str | None,
                 transformer: Any, hybrid: Any, span: Any) -> None:
        enter(cwd)
        self.settings = settings.model_copy(deep=True)
        self.status = status
        self.handles = {"transformer": transformer, "hybrid": hybrid}
        self.span = span

    async def __serve_build_asgi_app__(self) -> FastAPI:  # Ray Serve's late-bound ingress app
        """The router app over handles: each model deployment's facts, each span profile's
        answer from the span deployment, asked now (the deployments are up by then)."""
        from router.app import create_app

        settings = self.settings
        backends: dict[str, HandleBackend] = {}
        for role, handle in self.handles.items():
            if handle is None:
                continue
            bs = settings.backends[role]  # type: ignore[index]
            facts: BackendFacts = await handle.facts.remote()
            n = max(bs.replicas, bs.max_replicas or 0)
            backend = HandleBackend(bs.name, handle, facts, replicas=n,
                                    status=_bound(self.status, role))
            bs.max_concurrency = backend.max_concurrency  # the router's slot over N replicas
            backends[role] = backend
        span_service = None
        if self.span is not None:
            answers = {key: await self.span.check.remote(*key) for key in span_keys(settings)}
            t = settings.backends["transformer"]
            span_service = span_service_over(self.span, answers,
                                             settings.ray.span_replicas or t.replicas)
        app = create_app(settings, backends, span_service=span_service)
        app.add_middleware(ReplicaHeader, replica=replica_id())  # type: ignore[arg-type]
        return app


def _bound(status: Any, role: str) -> Any:
    if status is None:
        return None
    return lambda: status(role)
