"""Serving logic of the router: resolve the model, score, decide, call, fall back, format.

HTTP wiring lives in :mod:`router.app`, the protocol in :mod:`router.protocol`. State is held
by one :class:`RouterService` built in the app's lifespan and kept in ``app.state``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace

from fastapi.responses import JSONResponse, StreamingResponse

from classifiers.request import RoutingRequest
from models.base import GenerationParams, GenerationResult, Prompt, RequestError
from router import protocol as P
from router.conversations import Conversations, TextTap
from router.decision_log import DecisionLog, DecisionRow
from router.errors import (
    APIError,
    InvalidRequestError,
    ModelNotFoundError,
    UnavailableError,
    client_error,
    to_api_error,
)
from router.learning.exploration import Explorer
from router.metrics import RouterMetrics
from router.policies import Policy
from router.pool import BackendSlot, BackendStream
from router.probing import ProbeOutcome, backend_prompt, measure
from router.routing import (
    Ask,
    Resolution,
    check_gate,
    named_backend,
    other_role,
    scored,
    side_request,
    span_profile,
)
from router.settings import DEPRECATED_PROFILES, ProfileSettings, Settings
from router.span import (
    SPAN_ROLE,
    Draft,
    SpanService,
    check_span_profiles,
    default_profile,
    span_header,
    span_totals,
)
from router.streaming import sse_events

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "archroute"  # `model: "archroute"` means the default profile (resolved at start)


@dataclass
class Route:
    """One request while it is served. Its routing decision is ``decision``, immutable
    (:class:`~router.routing.Resolution`), already written into ``row``, the request's one
    record (:class:`~router.decision_log.DecisionRow`); serving adds the backend, the decision
    log stores the row as is, and the headers and the ``archroute`` object are read from
    it. Beside them, only what serving the request changes: the roles to try, what failed
    first, its parameters and tools, warnings."""

    row: DecisionRow
    decision: Resolution
    order: list[str] = field(default_factory=list)  # roles to try, in order
    # the backend that failed first while trying (the row records it once another served)
    failed_first: str | None = None
    fallback_reason: str | None = None
    warning: str | None = None  # sent as x-archroute-warning
    deprecated: str | None = None  # sent as x-archroute-deprecated (a deprecated model name)
    # the request's tool calling fields (None: it sent none); given to the serving backend
    # when it can call tools, else dropped with a warning (settings `tools`)
    tools: P.ToolFields | None = None
    params: GenerationParams | None = None  # the request's, built once (handle)
    # the gate that decodes it: the decision's, until a fallback serves it (None then)
    span_gate: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.span_gate = self.decision.span_gate

    @property
    def span_draft(self) -> Draft:
        return self.decision.span_draft

    @property
    def reasons(self) -> list[str] | None:
        """The decision in words (``explain``), None when not asked for."""
        r = self.decision.reasons
        return None if r is None else list(r)

    @property
    def span(self) -> dict | None:
        """What the response reports of span decoding: the totals once the span decoder
        has served it (``row.span``), ``{"gate": NAME}`` before that; None when the request
        is not span-decoded or fell back."""
        if self.row.span is not None:
            return self.row.span
        return {"gate": self.span_gate} if self.span_gate is not None else None

    def headers(self, overhead_ms: float) -> dict[str, str]:
        r = self.row
        h = {"x-archroute-backend": r.backend or "",
             "x-archroute-policy": r.policy or "direct",
             "x-archroute-overhead-ms": f"{overhead_ms:.3f}"}
        if r.profile:
            h["x-archroute-profile"] = r.profile
        if r.score is not None:
            h["x-archroute-score"] = f"{r.score:.4f}"
        if self.decision.probe_ms is not None:  # what the prompt probe added (ms)
            h["x-archroute-probe-ms"] = f"{self.decision.probe_ms:.3f}"
        if r.fallback_from:
            h["x-archroute-fallback"] = f"{r.fallback_from}; reason={self.fallback_reason}"
        if self.warning:
            h["x-archroute-warning"] = self.warning
        if self.deprecated:
            h["x-archroute-deprecated"] = self.deprecated
        span = self.span
        if span is not None:
            h["x-archroute-span"] = span_header(span)
        conv = self.decision.conversation
        if conv is not None:
            h["x-archroute-conversation"] = conv.header()
        return h

    def body(self, overhead_ms: float) -> dict:
        """The ``archroute`` object of a response (docs/router.md, "The decision"): the
        record's fields as the API names them."""
        r = self.row
        out: dict[str, object] = {
            "profile": r.profile, "policy": r.policy, "score": r.score,
            "threshold": r.threshold, "decision": r.decision, "backend": r.backend,
            "fallback_from": r.fallback_from, "side_request": r.side,
            "overhead_ms": round(overhead_ms, 3), "propensity": r.propensity,
            "explored": r.explored}
        if r.artifact is not None:
            out["artifact"] = r.artifact
        if self.reasons is not None:
            out["reasons"] = self.reasons
        span = self.span
        if span is not None:
            out["span"] = dict(span)
        if r.conversation is not None:
            out["conversation"] = r.conversation
        return out


@dataclass(frozen=True)
class RoutingState:
    """The policies and thresholds requests are routed with. A live reload
    (:mod:`router.reload`) builds a new one and swaps it in whole: a request reads it once,
    so it never mixes an old policy with a new threshold."""

    policies: dict[str, Policy]
    thresholds: dict[str, float]

    @classmethod
    def build(cls, settings: Settings, policies: dict[str, Policy]) -> RoutingState:
        # a profile without a threshold uses its policy's own (see ProfileSettings)
        return cls(policies, {name: p.threshold if p.threshold is not None
                              else policies[name].default_threshold()
                              for name, p in settings.profiles.items() if name in policies})


class RouterService:
    """Everything a request needs: settings, backend slots by role, policies by profile."""

    def __init__(self, settings: Settings, slots: dict[str, BackendSlot],
                 policies: dict[str, Policy], metrics: RouterMetrics,
                 decision_log: DecisionLog | None, span: SpanService | None = None) -> None:
        self.settings = settings
        self.slots = slots
        self.unreachable: dict[str, str] = {}  # backend name -> why (probe_backends)
        # span profiles' slots over the two backends (router/span.py)
        self.span = span if span is not None else SpanService(slots, slots["transformer"].limits)
        # every span profile's slot, built now (as every backend is): a configured one this
        # pair cannot span-decode is a SettingsError here; a built-in one is not served
        # (profile -> why; a request naming it gets a 404 that says so)
        self.span_unavailable = check_span_profiles(settings, self.span)
        self.profiles = {n: p for n, p in settings.profiles.items()
                         if n not in self.span_unavailable}  # the profiles served
        self.state = RoutingState.build(settings, policies)
        self.metrics = metrics
        self.decision_log = decision_log
        self._by_name = {s.name: role for role, s in slots.items()}
        # follow-up turns stay on their backend (router/conversations.py)
        self.conversations = Conversations(settings.conversation_cache, decision_log,
                                           self._by_name)
        self.created = int(time.time())  # the models' `created`: when this router started
        # exploration (profiles' epsilon): one seeded generator per service, seed logged
        self.explorer = Explorer(settings.exploration_seed)
        self.exploration_seed = self.explorer.seed
        self.default_profile = default_profile(settings, self.profiles, self.span_unavailable)
        exploring = {n: p.epsilon for n, p in settings.profiles.items() if p.epsilon}
        if exploring:
            log.info("exploration: %s, random seed %d", exploring, self.exploration_seed)

    @property
    def policies(self) -> dict[str, Policy]:
        return self.state.policies

    @property
    def thresholds(self) -> dict[str, float]:
        return self.state.thresholds

    @property
    def default_routing(self) -> str:
        """``span`` when `model: "archroute"` is span-decoded, else ``request``."""
        return "span" if self.profiles[self.default_profile].span_gate else "request"

    # --- routing -------------------------------------------------------------------
    def models(self) -> list[dict]:
        """``/v1/models``: the default alias ``archroute`` first (chat apps list ids and let
        users pick one), then the profiles, then the backends by name."""
        default = self.default_profile
        dp = self.profiles[default]
        state = self.state
        why = next(iter(self.span_unavailable.values()), None)  # a built-in span profile's
        no_span = f" (this pair cannot span-decode: {why})" if why is not None else ""

        def extra(name: str, p: ProfileSettings) -> dict:
            out: dict = ({"gate": p.span_gate, "draft_k": p.span_draft[0]}
                         if p.span_gate is not None else {})
            if p.span_gate is None:
                out["epsilon"] = p.epsilon
            art = state.policies[name].artifact_identity() if name in state.policies else None
            if art is not None:
                out["artifact"] = art
            return out

        out = [P.model_card(DEFAULT_ALIAS, "archroute", self.created, kind="profile",
                            policy=dp.policy, alias_of=default,
                            threshold=state.thresholds.get(default, dp.threshold),
                            routing=self.default_routing,
                            description=f"the default profile ({default}): " + (
                                "span decoding, a gate picks the model per token"
                                if self.default_routing == "span" else
                                "per-request routing" + no_span),
                            **extra(default, dp))]
        out += [P.model_card(name, "archroute", self.created, kind="profile", policy=p.policy,
                             threshold=state.thresholds.get(name, p.threshold),
                             description=p.description, **extra(name, p))
                for name, p in self.profiles.items()]
        for role, slot in self.slots.items():
            info = slot.backend.info()
            out.append(P.model_card(slot.name, "archroute", self.created, kind="backend", role=role,
                                    architecture=info.architecture, parameters=info.parameters,
                                    context_length=info.context_length))
        return out

    def not_found(self, model: str) -> ModelNotFoundError:
        """The 404 for a model this router does not serve; for a built-in span profile left
        out (the pair cannot span-decode), why."""
        known = sorted([*self.profiles, *self._by_name, DEFAULT_ALIAS])
        why = self.span_unavailable.get(model)
        if why is not None:
            return ModelNotFoundError(
                f"model {model!r} is not served by this router: this pair cannot span-decode "
                f"({why}); it serves {known}", param="model")
        return ModelNotFoundError(f"model {model!r} not found; this router serves {known}",
                                  param="model")

    def _profile(self, model: str) -> tuple[str, ProfileSettings] | None:
        name = self.default_profile if model == DEFAULT_ALIAS else model
        p = self.profiles.get(name)
        return (name, p) if p is not None else None

    def _order(self, role: str) -> list[str]:
        if role == SPAN_ROLE:  # a failed span decoder falls back like any backend
            return [role, "transformer"] if self.settings.fallback else [role]
        return [role, other_role(role)] if self.settings.fallback else [role]

    def _slot(self, route: Route, role: str) -> BackendSlot:
        """The slot serving ``role`` for this route (a span route's gate has its own)."""
        if role == SPAN_ROLE and route.span_gate is not None:
            return self.span.slot(route.span_gate, route.span_draft)
        return self.slots[role]

    async def route(self, row: DecisionRow, rreq: RoutingRequest, threshold: float | None,
                    explain: bool = False, count: bool = True,
                    gate: str | None = None) -> Route:
        """The decision for one request (``row.model`` is the model it asked for), recorded
        in ``row``: :meth:`resolve`, with a deprecated profile name (``DEPRECATED_PROFILES``,
        when the router has no profile of that name) served as the profile it became, and
        said in an ``x-archroute-deprecated`` header. ``count`` False (``/v1/route``): no
        exploration, nothing counted. A request refused here leaves ``row`` undecided."""
        model, deprecated = row.model, None
        target = DEPRECATED_PROFILES.get(model)
        if (target is not None and model not in self.profiles
                and target in self.profiles):
            model, deprecated = target, f"model {model!r} is deprecated: it is {target!r}, use that name"
        found = self._profile(model)
        earlier = (await self.conversations.earlier(rreq)
                   if found is not None and found[1].conversation.sticky
                   and found[1].span_gate is None else None)
        decision = await self.resolve(Ask(model, rreq, threshold, explain, count, gate, earlier))
        decision.record(row)
        if decision.counted is not None:  # a decision the router carries out
            self.metrics.decisions.labels(decision.counted, decision.role).inc()
            if decision.conversation is not None:
                self.metrics.conversation_turns.labels(
                    decision.profile, decision.conversation.outcome).inc()
            if decision.explored:
                self.metrics.explored.labels(decision.profile, decision.role).inc()
        if decision.probe_ms is not None:  # a probe profile's prompt probe (router/probing.py)
            self.metrics.probe_latency.observe(decision.probe_ms / 1000)
            if decision.probe_failure is not None:
                self.metrics.probe_fallbacks.labels(decision.profile,
                                                    decision.probe_failure).inc()
                log.warning("profile %s: the prompt probe failed (%s); scored without it",
                            decision.profile, decision.probe_failure)
        order = self._order(decision.role) if decision.fallback else [decision.role]
        return Route(row, decision, order, deprecated=deprecated)

    async def resolve(self, ask: Ask) -> Resolution:
        """The resolvers of :mod:`router.routing`, in order: a backend named directly, then
        the profile's (a 404 for an unknown model): a chat app's side request, the span
        decoder, or the profile's policy."""
        state = self.state  # read once: a reload swaps it whole
        named = named_backend(ask, self._by_name)
        if named is not None:
            return named
        found = self._profile(ask.model)
        if found is None:
            raise self.not_found(ask.model)
        name, prof = found
        check_gate(ask, name, prof)
        return (side_request(ask, name, self.settings.side_requests)
                or await span_profile(ask, name, prof, self.span)
                or await scored(ask, name, prof, state.policies[name], state.thresholds[name],
                                self.explorer, self.probe))

    async def probe(self, rreq: RoutingRequest) -> ProbeOutcome:
        """The prompt probe for a ``needs_probe`` policy (:func:`router.probing.measure`:
        both backends' prefill, within the ``probe_timeout_s`` setting)."""
        return await measure(self.slots, backend_prompt(rreq), self.settings.probe_timeout_s)

    def params(self, body: P.ChatCompletionRequest | P.CompletionRequest,
               i: int = 0) -> GenerationParams:
        asked = body.requested_max_tokens() or self.settings.default_max_tokens
        max_tokens = None if asked is None else min(asked, self.settings.max_tokens_cap)
        seed = None if body.seed is None else body.seed + i
        # vLLM's ignore_eos on completions (decode to max_tokens: fixed-length benchmarks)
        ignore_eos = isinstance(body, P.CompletionRequest) and body.ignore_eos
        return GenerationParams(max_tokens=max_tokens, temperature=body.temperature,
                                top_p=body.top_p, seed=seed, stop=body.stop_list(),
                                ignore_eos=ignore_eos)

    def _note_failure(self, route: Route, slot: BackendSlot, exc: BaseException,
                      errors: list[BaseException]) -> None:
        """Count and log (with the request id) a backend's failure; ``errors`` gets what the
        client would see of it (router/errors.py: no backend or exception text)."""
        errors.append(to_api_error(exc, slot.name, route.row.request_id))
        self.metrics.backend_failures.labels(slot.name).inc()
        self.metrics.breaker_open.labels(slot.name).set(float(slot.state == "open"))
        if route.failed_first is None and len(route.order) > 1:
            route.failed_first = slot.name
            route.fallback_reason = to_api_error(exc).code or "error"
        log.warning("request %s: backend %s failed (%s: %s)", route.row.request_id, slot.name,
                    type(exc).__name__, exc)

    @staticmethod
    def _final_error(errors: list[BaseException]) -> BaseException:
        """The most telling error once every backend failed (a cool-down says least)."""
        for e in errors:
            if not isinstance(e, UnavailableError):
                return e
        return errors[0]

    def _served(self, route: Route, slot: BackendSlot) -> None:
        route.row.backend, route.row.fallback_from = slot.name, route.failed_first
        if slot.role != SPAN_ROLE:  # a span route that fell back: no span to report
            route.span_gate = None
        self.metrics.served.labels(slot.name).inc()
        if route.failed_first:
            self.metrics.fallbacks.labels(route.failed_first, slot.name).inc()
        self.metrics.breaker_open.labels(slot.name).set(0.0)

    def deadline(self, route: Route) -> float:
        """The request's end-to-end deadline (monotonic): the first backend's ``timeout_s``
        from now, shared by the queue wait, the call and any fallback, so a client waits at
        most that long for an answer or an error, not once per backend."""
        return time.monotonic() + self._slot(route, route.order[0]).limits.timeout_s

    # --- tool calling ------------------------------------------------------------------
    @staticmethod
    def _tool_fields(body: P.ChatCompletionRequest | P.CompletionRequest) -> P.ToolFields | None:
        """The request's tool calling fields, None when it sent none. A completion request's
        are only named (``/v1/completions`` takes no tools: never passed on)."""
        if isinstance(body, P.ChatCompletionRequest):
            return body.tool_fields()
        extra = body.model_extra
        if not extra:
            return None
        sent = tuple(k for k in P.TOOL_FIELDS if extra.get(k))
        return P.ToolFields(sent) if sent else None

    def _plan_tools(self, route: Route, tools: P.ToolFields) -> None:
        """Settings ``tools`` for a routed request that sent tools. ``error``: a 400 when the
        chosen backend cannot call tools, and no fallback to one that cannot. ``auto`` and
        ``drop`` decide per backend as it is tried (:meth:`_params_for`)."""
        route.tools = tools
        if self.settings.tools != "error":
            return
        field = tools.sent[0]
        if not tools.passable:
            raise InvalidRequestError(f"{field}: /v1/completions takes no tools (send them to "
                                      "/v1/chat/completions)", param=field)
        first = self._slot(route, route.order[0])
        if not first.backend.can_call_tools:
            raise InvalidRequestError(
                f"{field}: backend {first.name!r} cannot call tools (only an upstream that "
                "takes tools can); send the request without tools, or set `tools: auto` to "
                "have them dropped for such a backend", param=field)
        route.order = [route.order[0], *(r for r in route.order[1:]
                                         if self._slot(route, r).backend.can_call_tools)]

    def _params_for(self, route: Route, slot: BackendSlot,
                    body: P.ChatCompletionRequest | P.CompletionRequest,
                    i: int = 0) -> GenerationParams:
        """The request's parameters (built once, ``route.params``; choice ``i`` of ``n``
        gets seed + i), with its tools when ``slot`` takes them; when it does not, the
        route's warning says they were dropped. A copy whenever it differs, so a fallback
        never inherits what was set for the backend before it."""
        params = route.params if route.params is not None else self.params(body)
        if i and body.seed is not None:
            params = replace(params, seed=body.seed + i)
        tools = route.tools
        if tools is None:
            return params
        if self.settings.tools == "drop":
            route.warning = f"{', '.join(tools.sent)} ignored (router setting tools: drop)"
        elif not tools.passable:
            route.warning = f"{', '.join(tools.sent)} ignored: /v1/completions takes no tools"
        elif not slot.backend.can_call_tools:
            route.warning = f"{', '.join(tools.sent)} ignored: {slot.name} cannot call tools"
        else:
            route.warning = None
            params = tools.apply(replace(params))
        return params

    # --- whole responses -------------------------------------------------------------
    async def generate(self, route: Route, prompt: Prompt,
                       body: P.ChatCompletionRequest | P.CompletionRequest,
                       ) -> tuple[list[GenerationResult], float]:
        """n generations from the first backend in ``route.order`` that serves them all;
        returns them and the seconds spent in backend calls."""
        errors: list[BaseException] = []
        spent = 0.0
        deadline = self.deadline(route)
        for role in route.order:
            slot = self._slot(route, role)
            t = time.perf_counter()
            try:
                results = [await slot.generate(prompt, self._params_for(route, slot, body, i),
                                               deadline) for i in range(body.n)]
            except asyncio.CancelledError:  # the client left
                raise
            except RequestError as exc:  # the client's fault: no fallback; in our words
                raise to_api_error(exc, slot.name, route.row.request_id) from exc
            except Exception as exc:  # noqa: BLE001 - decide below: fall back or report
                spent += time.perf_counter() - t
                self._note_failure(route, slot, exc, errors)
                continue
            spent += time.perf_counter() - t
            self._served(route, slot)
            return results, spent
        raise self._final_error(errors)

    # --- streams ---------------------------------------------------------------------
    async def open_stream(self, route: Route, prompt: Prompt,
                          body: P.ChatCompletionRequest | P.CompletionRequest) -> BackendStream:
        """The first backend in ``route.order`` that sends a first chunk."""
        errors: list[BaseException] = []
        deadline = self.deadline(route)
        for role in route.order:
            slot = self._slot(route, role)
            try:
                stream = await slot.open_stream(prompt, self._params_for(route, slot, body),
                                                deadline)
            except asyncio.CancelledError:  # the client left
                raise
            except RequestError as exc:  # the client's fault: no fallback; in our words
                raise to_api_error(exc, slot.name, route.row.request_id) from exc
            except Exception as exc:  # noqa: BLE001
                self._note_failure(route, slot, exc, errors)
                continue
            self._served(route, slot)
            return stream
        raise self._final_error(errors)

    # --- the two endpoints -----------------------------------------------------------
    @staticmethod
    def request_of(body: P.ChatCompletionRequest | P.CompletionRequest,
                   ) -> tuple[Prompt, RoutingRequest]:
        """(what the backend is given, what the policy sees) for a request body."""
        if isinstance(body, P.ChatCompletionRequest):
            try:
                messages = body.chat_messages()
            except ValueError as exc:  # the request's own checks (router/protocol.py)
                raise client_error(exc) from None
            return messages, RoutingRequest(tuple(messages), body.requested_max_tokens(), "chat")
        if body.logprobs is not None:
            raise InvalidRequestError("logprobs: not supported by the router (call a "
                                      "backend's own server)", param="logprobs")
        try:
            prompt = body.prompt_text()
        except ValueError as exc:
            raise client_error(exc) from None
        return prompt, RoutingRequest.from_prompt(prompt, body.requested_max_tokens())

    async def decide_only(self, body: P.ChatCompletionRequest | P.CompletionRequest) -> dict:
        """``POST /v1/route``: the decision the chat endpoint would make for ``body`` (same
        profile, threshold and policy), with its reasons, and no generation."""
        t0 = time.perf_counter()
        _, rreq = self.request_of(body)
        opts = body.archroute
        row = DecisionRow("", "route", body.model)  # not logged: nothing is served
        route = await self.route(row, rreq, opts.threshold if opts else None,
                                 explain=True, count=False, gate=opts.gate if opts else None)
        role = route.order[0]
        slot = self._slot(route, role)
        out = route.body((time.perf_counter() - t0) * 1000)
        out.update(backend=slot.name, decision=role, fallback_from=None,
                   available=slot.state != "open", features=row.features)
        return {"object": "archroute.route", "model": body.model, **out}

    async def handle(self, body: P.ChatCompletionRequest | P.CompletionRequest,
                     t0: float) -> JSONResponse | StreamingResponse:
        chat = isinstance(body, P.ChatCompletionRequest)
        endpoint = "chat" if chat else "completion"
        body.log_unknown(endpoint)
        row = DecisionRow(P.new_id("chatcmpl" if chat else "cmpl"), endpoint, body.model,
                          stream=body.stream)
        try:
            prompt, rreq = self.request_of(body)
            if body.stream and body.n > 1:
                raise InvalidRequestError("n > 1 is not supported with stream", param="n")
            params = self.params(body)  # built once, and validated before routing
            tools = self._tool_fields(body)
            opts = body.archroute
            route = await self.route(row, rreq, opts.threshold if opts else None,
                                     explain=bool(opts and opts.explain),
                                     gate=opts.gate if opts else None)
            route.params = params
            if tools is not None:
                self._plan_tools(route, tools)
            if self.decision_log is not None and self.decision_log.log_prompts:
                row.prompt = rreq.text
                row.request = {"kind": rreq.kind, "max_tokens": rreq.max_tokens,
                               "messages": [{"role": m.role, "content": m.content}
                                            for m in rreq.messages]}
            if body.stream:
                return await self._stream_response(route, prompt, body, t0, rreq)
            results, spent = await self.generate(route, prompt, body)
        except Exception as exc:  # noqa: BLE001 - one mapper makes the envelope
            err = to_api_error(exc, request_id=row.request_id)
            self._finish(row, t0, None, err.status, err.message)
            raise err from exc
        if route.span_gate is not None:
            row.span = span_totals(route.span_gate, (r.span for r in results))
        row.prompt_tokens = results[0].prompt_tokens
        row.completion_tokens = sum(r.completion_tokens for r in results)
        if route.decision.sticky and chat:  # the next turn resends one of these answers
            for r in reversed(results):
                row.turn_key = self._remember(row, rreq, r.text, r.completion_tokens)
        total = time.perf_counter() - t0
        overhead_ms = (total - spent) * 1000
        extra = {"archroute": route.body(overhead_ms)} if self.settings.decision_in_body else None
        echo = prompt if getattr(body, "echo", False) and isinstance(prompt, str) else ""
        choices = [(echo + r.text, str(r.finish_reason)) for r in results]
        args = (row.request_id, body.model, choices, row.prompt_tokens, row.completion_tokens)
        if not chat:
            payload = P.completion_response(*args, extra=extra)
        elif route.tools is None:
            payload = P.chat_response(*args, extra=extra)
        else:
            payload = P.chat_response(*args, extra=extra,
                                      tool_calls=[r.tool_calls for r in results])
        if extra is not None:  # chat apps keep `usage` (Open WebUI shows it per message)
            payload["usage"]["archroute_backend"] = row.backend
        self._finish(row, t0, overhead_ms, 200, None)
        return JSONResponse(payload, headers=route.headers(overhead_ms))

    def _remember(self, row: DecisionRow, rreq: RoutingRequest, answer: str,
                  completion_tokens: int | None) -> str | None:
        """Remember an answered turn for its follow-up (router/conversations.py)."""
        role = self._by_name.get(row.backend or "")
        if role is None:
            return None
        return self.conversations.remember(rreq, answer, role, row.prompt_tokens,
                                           completion_tokens)

    async def _stream_response(self, route: Route, prompt: Prompt,
                               body: P.ChatCompletionRequest | P.CompletionRequest,
                               t0: float, rreq: RoutingRequest) -> StreamingResponse:
        row = route.row
        stream = await self.open_stream(route, prompt, body)
        chat = isinstance(body, P.ChatCompletionRequest)
        tap = TextTap(stream) if route.decision.sticky and chat else None
        overhead_ms = (time.perf_counter() - t0) * 1000  # before the first byte only
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        echo = getattr(body, "echo", False)
        ext = route.body(overhead_ms) if self.settings.decision_in_body else None

        def on_span(span: dict) -> None:
            if route.span_gate is not None:
                row.span = span_totals(route.span_gate, [span])

        def on_end(status: int, error: str | None, n_prompt: int | None,
                   n_completion: int | None) -> None:
            if error is not None and status == 200:
                self.metrics.backend_failures.labels(stream.slot.name).inc()
            row.prompt_tokens, row.completion_tokens = n_prompt, n_completion
            if tap is not None and status == 200 and error is None:
                row.turn_key = self._remember(row, rreq, tap.text, n_completion)
            self._finish(row, t0, overhead_ms, status, error)

        events = sse_events(stream if tap is None else tap.as_stream(), rid=row.request_id,
                            model=body.model, chat=chat, include_usage=include_usage,
                            echo=prompt if echo and isinstance(prompt, str) else "",
                            ext=ext, on_end=on_end, on_span=on_span)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers=route.headers(overhead_ms))

    def _finish(self, row: DecisionRow, t0: float, overhead_ms: float | None, status: int,
                error: str | None) -> None:
        total = time.perf_counter() - t0
        row.latency_ms, row.overhead_ms = total * 1000, overhead_ms
        row.status, row.error = status, error
        model = row.model if row.decision else "unknown"  # bound label cardinality
        self.metrics.requests.labels(row.endpoint, model, str(status)).inc()
        self.metrics.latency.labels(row.endpoint).observe(total)
        if overhead_ms is not None:
            self.metrics.overhead.observe(overhead_ms / 1000)
        if self.decision_log is not None:
            self.decision_log.write(row)


async def probe_backends(service: RouterService, log_down: bool = True) -> None:
    """Ask every backend whether it can be reached (:meth:`Backend.aprobe`, concurrently);
    ``service.unreachable`` gets the ones that cannot, with why. At start-up each is a
    warning: a router in front of a server that is not there should say so."""
    slots = list(service.slots.values())
    found = await asyncio.gather(*(s.backend.aprobe() for s in slots), return_exceptions=True)
    for slot, why in zip(slots, found, strict=True):
        if isinstance(why, BaseException):
            why = f"probe failed ({type(why).__name__})"
        if why is None:
            service.unreachable.pop(slot.name, None)
            continue
        if log_down and slot.name not in service.unreachable:
            log.warning("backend %s: %s; requests routed to it will fail over or fail",
                        slot.name, why)
        service.unreachable[slot.name] = why


async def check_ready(service: RouterService) -> tuple[bool, dict]:
    """Ready when at least one backend is loaded, reachable and not cooling down. Backends
    found unreachable are asked again (and reported with why while they stay so)."""
    if service.unreachable:
        await probe_backends(service, log_down=False)
    states = {s.name: {"role": role, "state": s.state, "in_flight": s.in_flight,
                       "waiting": s.waiting} for role, s in service.slots.items()}
    for name, why in service.unreachable.items():
        if name in states:
            states[name]["unreachable"] = why
    ok = any(v["state"] != "open" and "unreachable" not in v for v in states.values())
    for (gate, _draft), s in service.span.slots.items():  # shown; readiness is the models'
        states.setdefault(s.name, {"role": SPAN_ROLE, "gate": gate, "state": s.state,
                                   "in_flight": s.in_flight, "waiting": s.waiting})
    return ok, states


__all__ = ["APIError", "RouterService", "Route", "RoutingState", "check_ready"]
