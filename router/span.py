"""Span profiles: requests served by the span decoder over the router's two backends, a
gate choosing the model per token. Span decoding is a backend kind of its own, built and
checked at start like every backend.

A profile with ``policy: span`` (``policy_args: {gate: NAME, draft_k: K}``) has no policy to
score with: its requests go to a span backend over the configured transformer and hybrid,
one per gate and draft setting (a request may name another registry gate with
``"archroute": {"gate": NAME}``, built on first use), each behind its own
:class:`~router.pool.BackendSlot` (role ``span``) with the transformer's limits, shown in
``/ready`` and ``/metrics`` by its name (``span:GATE``, ``span-remote:GATE``).

- Two in-process models (:class:`~models.span.decoder.SpanBackend`): the decoder holds both
  models' forward locks while it generates, so span and single-model requests take turns on
  the models. Its slot has its own breaker: the decoder (gate, drafting, both caches) is code
  of its own that can fail while either model alone serves.
- Two upstreams, OpenAI-compatible engines (:class:`~models.span.remote.RemoteSpanBackend`):
  one completions request per span, token ids in and out, the stream closed when the gate
  switches. It needs the engines' tokenizer locally (``backends.transformer.tokenizer``, a
  tokenizer directory; the hybrid's, if set, must split text the same way) and a gate over
  tokens (``copy-k``, ``brackets``) or one trained on the top-k entropy proxy the engines
  return (``learned-topk``: the in-process ``learned`` reads each model's entropy, which the
  completions API does not return). Each span's request is admitted by that engine's own
  slot (:meth:`~router.pool.BackendSlot.held`): its limits, and its breaker hears the
  verdict, so an engine has one breaker whoever calls it. The span slot has none of its own
  (:class:`EngineSpanSlot`): it is open while either engine's breaker is.

At start (:func:`check_span_profiles`) every span profile's slot is built. One the
configuration names (a file, an environment variable, a flag, or ``default_profile``) that
cannot span-decode on this pair (a fake, an in-process model beside an upstream, tokenizers
that differ, engines without a tokenizer setting, an entropy gate over engines, a gate that
does not load, drafting a transformer whose cache cannot drop positions) stops the router
with one line naming the profile, the setting and why (a :class:`~router.settings.SettingsError`).
A built-in one (``archroute-span`` of the defaults) is not served on such a pair: absent
from ``/v1/models``, a request naming it gets a 404 that says why, and ``model: "archroute"``
means the request classifier's profile (:func:`default_profile`). Over two engines the
built-in profile's gate is ``learned-topk`` (the settings choose it,
``Settings._engine_span_gate``), so ``archroute`` is span routing there too; a gate a
profile names is never replaced.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from models.base import Backend
from models.span.gates import GATES, Gate, UnknownGateError, get_gate, known_gate
from router.errors import InvalidRequestError, UnavailableError
from router.pool import BackendSlot, SlotLimits
from router.settings import ProfileSettings, Settings, SettingsError

log = logging.getLogger(__name__)

SPAN_ROLE = "span"  # the role of span slots (Route.order, BackendSlot.role)
_UNCHECKED = object()
PAIR = "backends.transformer, backends.hybrid"  # the setting a pair problem is in
PROBE_TIMEOUT_S = 10.0  # the start-up question to each engine (SpanService._engine_problem)


def span_header(span: Mapping[str, object]) -> str:
    """``x-archroute-span``: ``transformer=12; hybrid=30; switches=5; catchup=17; gate=copy-2``
    (with drafted copy spans ``drafted=40; accepted=31`` after ``catchup``; with a mixing
    gate ``mixed=9``, the tokens both models predicted; over two engines ``requests=6;
    wasted=0`` in place of ``catchup``; only ``gate=...``
    before the answer is known, i.e. on a stream)."""
    keys = ("transformer", "hybrid", "switches", "catchup", "drafted", "accepted", "mixed",
            "requests", "wasted", "gate")
    return "; ".join(f"{k}={span[k]}" for k in keys if k in span)


def span_totals(gate: str, spans: Iterable[Mapping[str, object] | None]) -> dict[str, object]:
    """The span totals of one response (``n`` > 1: summed over its choices)."""
    out: dict[str, object] = {"gate": gate}
    for s in spans:
        for k, v in (s or {}).items():
            if k != "gate" and isinstance(v, int):
                out[k] = int(out.get(k, 0)) + v  # type: ignore[call-overload]
    return out


Draft = tuple[int, int]  # (draft_k, draft_min_match) of a span profile; draft_k 0: off
NO_DRAFT: Draft = (0, 2)


class SpanUnavailableError(InvalidRequestError):
    """This router cannot span-decode with a gate and draft setting. A request that names
    the gate gets it as a 400; at start, for a span profile the configuration names, it is a
    settings error naming ``setting``: ``policy_args.*`` (the profile's), or a backend
    setting (``backends...``)."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message, param="archroute.gate" if setting == "policy_args.gate"
                         else "model")
        self.setting = setting


class EngineSpanSlot(BackendSlot):
    """The slot of span decoding over two engines: its own concurrency limit and queue, no
    breaker of its own. Each span is one request to one engine, admitted by that engine's
    slot (``engines``, by role; :meth:`BackendSlot.held`), whose breaker hears how it went:
    an engine has one breaker, whoever calls it. This slot is open while either engine's
    breaker is (the gate may need it), half-open while one waits for its probe."""

    def __init__(self, backend: Backend, limits: SlotLimits,
                 engines: Mapping[str, BackendSlot]) -> None:
        super().__init__(SPAN_ROLE, backend, limits)
        self.engines = dict(engines)

    @property
    def state(self) -> str:
        states = {s.state for s in self.engines.values()}
        return "open" if "open" in states else "half-open" if "half-open" in states else "closed"

    async def acquire(self, deadline: float | None = None) -> bool:
        down = [s.name for s in self.engines.values() if s.state == "open"]
        if down:
            raise UnavailableError(f"backend {self.name}: engine {', '.join(down)} is cooling "
                                   "down after failures")
        return await super().acquire(deadline)

    def record_success(self) -> None:
        """Nothing: each engine's slot heard its own calls."""

    def record_failure(self) -> None:
        """Nothing: the engine that failed told its own breaker (a failure of the span code
        itself falls back to the transformer, as any failed call does)."""


class SpanService:
    """The span slots of one router, by gate name and draft setting: the profiles' built at
    start (:func:`check_span_profiles`), a gate a request names on first use."""

    def __init__(self, pair: Mapping[str, BackendSlot], limits: SlotLimits,
                 gates: Mapping[str, Gate] | None = None,
                 tokenizers: Mapping[str, str | None] | None = None) -> None:
        self.pair = dict(pair)  # role -> the backend's own slot (transformer, hybrid)
        self.transformer = pair["transformer"].backend
        self.hybrid = pair["hybrid"].backend
        # role -> a local tokenizer directory (upstreams: span decoding over engines)
        self.tokenizers = {k: v for k, v in (tokenizers or {}).items() if v}
        self._engine_tokenizer: Any = None
        self.limits = limits
        self.gates: dict[str, Gate] = dict(gates or {})  # gates loaded so far, by name
        self.slots: dict[tuple[str, Draft], BackendSlot] = {}
        self._why: object = _UNCHECKED  # why the pair cannot be span-decoded (None: it can)
        # why the engines cannot take a span's request (None: they can, or were not asked
        # yet, or did not answer: _check_engines)
        self._engines_asked = False
        self._engine_problem: tuple[str, str] | None = None  # (why, the backend setting)

    def _pair_problem(self) -> str | None:
        if self._why is _UNCHECKED:
            from models.span.decoder import pair_mismatch

            self._why = pair_mismatch(self.transformer, self.hybrid)
        return self._why  # type: ignore[return-value]

    def check_gate(self, name: str, configured: str) -> None:
        """A 400 unless ``name`` is the profile's gate or a gate of the registry (a request
        cannot make the router load a file: ``learned:PATH`` only from the config)."""
        if name != configured and not known_gate(name):
            raise InvalidRequestError(
                f"archroute.gate: unknown gate {name!r}; known gates: {', '.join(GATES)}",
                param="archroute.gate")

    @property
    def engines(self) -> bool:
        """True when both backends are engines (upstreams): span decoding over engines."""
        from models.upstream import OpenAIUpstreamBackend

        return (isinstance(self.transformer, OpenAIUpstreamBackend)
                and isinstance(self.hybrid, OpenAIUpstreamBackend))

    def _tokenizer(self) -> Any:
        """The engines' shared tokenizer, loaded once from the backends' ``tokenizer``
        setting (both set: they must split text alike)."""
        if self._engine_tokenizer is not None:
            return self._engine_tokenizer
        if not self.tokenizers:
            raise SpanUnavailableError(
                "span routing over two engines sends them token ids, so the router needs "
                "their tokenizer: set backends.transformer.tokenizer to a local tokenizer "
                "directory of the engines' model", "backends.transformer.tokenizer")
        from transformers import AutoTokenizer

        from models.span.decoder import PROBE

        toks = {}
        for role, path in self.tokenizers.items():
            try:
                toks[role] = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - a bad path: say which
                raise SpanUnavailableError(f"backends.{role}.tokenizer: cannot load {path!r} "
                                           f"({type(exc).__name__}: {exc})",
                                           f"backends.{role}.tokenizer") from None
        ids = {r: t(PROBE, add_special_tokens=False)["input_ids"] for r, t in toks.items()}
        if len({tuple(v) for v in ids.values()}) > 1:
            raise SpanUnavailableError("span routing needs one tokenizer: the transformer's "
                                       "and the hybrid's split the same text differently",
                                       "backends.hybrid.tokenizer")
        self._engine_tokenizer = next(iter(toks.values()))
        return self._engine_tokenizer

    def _check_engines(self, ids: list[int]) -> None:
        """Ask each engine, once (the first span slot over engines, at start), for one token
        from a token-id prompt, as a span does (``prompt: [ids]``,
        ``return_tokens_as_token_ids``). One that refuses it (a 4xx) or streams no token ids
        cannot span-decode (:class:`SpanUnavailableError` naming its backend); one that does
        not answer now (unreachable, an error status, no answer within
        :data:`PROBE_TIMEOUT_S`) is not judged: its own slot finds out at the first request,
        as for any backend. Blocking (at start, or in :meth:`prepare`'s thread)."""
        if not self._engines_asked:
            self._engine_problem = self._ask_engines(ids)
            self._engines_asked = True
        if self._engine_problem is not None:
            raise SpanUnavailableError(*self._engine_problem)

    def _ask_engines(self, ids: list[int]) -> tuple[str, str] | None:
        async def ask_all() -> list[str | None]:
            try:
                return await asyncio.gather(*(_token_id_problem(role, slot.backend, ids)
                                              for role, slot in self.pair.items()))
            finally:
                for slot in self.pair.values():
                    await slot.backend.aclose()  # this thread's loop's sessions

        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # off any running loop
            answers = pool.submit(asyncio.run, ask_all()).result()
        return next(((why, f"backends.{role}") for role, why in zip(self.pair, answers,
                                                                   strict=True)
                     if why is not None), None)

    def _gate(self, name: str) -> Gate:
        gate = self.gates.get(name)
        if gate is None:
            try:
                gate = get_gate(name)
            except UnknownGateError as exc:
                raise SpanUnavailableError(str(exc), "policy_args.gate") from None
            except Exception as exc:  # noqa: BLE001 - e.g. no trained learned gate here
                raise SpanUnavailableError(
                    f"gate {name!r} is not available on this router "
                    f"({type(exc).__name__}: {exc})", "policy_args.gate") from None
            self.gates[name] = gate
        return gate

    def _build(self, gate_name: str, draft: Draft = NO_DRAFT) -> BackendSlot:
        from models.span.decoder import IncompatiblePairError, SpanBackend

        engines = self.engines
        why = None if engines else self._pair_problem()
        if why is not None:
            raise SpanUnavailableError(
                f"span routing needs two in-process backends sharing a tokenizer: {why}. "
                "Serve both models in-process (kind: hf), or two engines (kind: upstream) with "
                "backends.transformer.tokenizer set", PAIR)
        gate = self._gate(gate_name)
        if engines:
            return self._remote_slot(gate)
        try:
            backend = SpanBackend(self.transformer, self.hybrid, gate,
                                  max_concurrency=self.limits.max_concurrency,
                                  draft_k=draft[0], draft_min_match=draft[1])
        except (IncompatiblePairError, ValueError) as exc:  # a draft the pair cannot do
            what = str(exc).split(":", 1)[0]
            raise SpanUnavailableError(str(exc), f"policy_args.{what}" if what in (
                "draft_k", "draft_min_match") else PAIR) from None
        return BackendSlot(SPAN_ROLE, backend, self.limits)

    def _remote_slot(self, gate: Gate) -> BackendSlot:
        from models.span.remote import RemoteSpanBackend, RemoteSpanError

        tok = self._tokenizer()
        n = getattr(tok, "model_max_length", None)
        try:
            backend = RemoteSpanBackend(
                self.transformer, self.hybrid, tok, gate,  # type: ignore[arg-type]
                context_length=n if isinstance(n, int) and n < 10**7 else None,
                max_concurrency=self.limits.max_concurrency,
                admit=lambda role: self.pair[role].held())
        except RemoteSpanError as exc:
            raise SpanUnavailableError(str(exc), "policy_args.gate") from None
        self._check_engines(backend.prompt_ids("Hello"))  # what a first span sends
        return EngineSpanSlot(backend, self.limits, self.pair)

    def _key(self, gate_name: str, draft: Draft) -> tuple[str, Draft]:
        return (gate_name, NO_DRAFT if self.engines else draft)  # engines decode the spans

    async def prepare(self, gate_name: str, draft: Draft = NO_DRAFT) -> BackendSlot:
        """The slot of ``gate_name`` with ``draft``, built (in a thread: a gate may load a
        file) on first use (a gate a request names); a 400 when the pair cannot be
        span-decoded with it or the gate does not load. Over two engines ``draft`` does not
        apply (the engines decode the spans)."""
        key = self._key(gate_name, draft)
        slot = self.slots.get(key)
        if slot is None:
            built = await asyncio.to_thread(self._build, *key)
            slot = self.slots.setdefault(key, built)
        return slot

    def slot(self, gate_name: str, draft: Draft = NO_DRAFT) -> BackendSlot:
        """The slot :meth:`prepare` (or :meth:`build`) built for ``gate_name`` and ``draft``."""
        return self.slots[self._key(gate_name, draft)]

    def build(self, gate_name: str, draft: Draft = NO_DRAFT) -> BackendSlot:
        """The slot of ``gate_name`` with ``draft``, built now (at start, before the loop
        serves); :class:`SpanUnavailableError` says why this router cannot have it."""
        key = self._key(gate_name, draft)
        if key not in self.slots:
            self.slots[key] = self._build(*key)
        return self.slots[key]


async def _token_id_problem(role: str, engine: Backend, ids: list[int]) -> str | None:
    """Why ``engine`` cannot serve a span's request (a token-id prompt, token ids streamed
    back); None when it can, or when it does not answer now (not judged: logged)."""
    from models.base import BackendError, RequestError
    from models.upstream import OpenAIUpstreamBackend

    assert isinstance(engine, OpenAIUpstreamBackend)
    body = {"model": engine.model, "prompt": ids, "max_tokens": 1, "temperature": 0,
            "stream": True, "logprobs": 1, "return_tokens_as_token_ids": True}
    what = f"the {role} engine {engine.name!r} ({engine.base_url})"
    tokens: list[object] = []
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S), \
                engine.sse_lines("/completions", body) as lines:
            async for line in lines:
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    for choice in json.loads(line[5:]).get("choices") or []:
                        tokens += (choice.get("logprobs") or {}).get("tokens") or []
    except RequestError as exc:  # a 4xx: it refuses the request span decoding sends
        return (f"{what} does not take token-id prompts (span decoding sends the token ids "
                f"so far as `prompt`): {exc}")
    except (BackendError, TimeoutError, ValueError) as exc:
        log.warning("span: %s did not answer a token-id prompt at start (%s); not judged",
                    what, exc)
        return None
    if not tokens or not all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        return (f"{what} does not stream token ids (span decoding asks for "
                "return_tokens_as_token_ids with logprobs; vLLM and serve-model return them)")
    return None


def check_span_profiles(settings: Settings, span: SpanService) -> dict[str, str]:
    """Build every span profile's slot now, as every backend is built at start. A profile
    the configuration names that cannot span-decode on this pair is a
    :class:`~router.settings.SettingsError`, one line naming the profile, the setting and
    why; a built-in one (:meth:`~router.settings.Settings.builtin_profiles`, not
    ``default_profile``) is left out: returned, with why, and logged. The rest are served."""
    builtin = settings.builtin_profiles() - {settings.default_profile}
    out = {}
    for name, prof in settings.profiles.items():
        if prof.span_gate is None:
            continue
        try:
            span.build(prof.span_gate, prof.span_draft)
        except SpanUnavailableError as exc:
            if name not in builtin:
                where = (f"profiles.{name}.{exc.setting}" if exc.setting.startswith("policy_args")
                         else exc.setting)
                raise SettingsError(f"invalid settings: profiles.{name}: cannot span-decode on "
                                    f"this pair ({where}): {exc.message}") from None
            out[name] = exc.message
            log.info("built-in profile %s is not served: this pair cannot span-decode (%s)",
                     name, exc.message)
    return out


def default_profile(settings: Settings, served: Mapping[str, ProfileSettings],
                    unserved: Mapping[str, str]) -> str:
    """What `model: "archroute"` means on this router: ``default_profile`` when set; unset,
    ``archroute-span`` where it is served (the pair can span-decode with its gate), else the
    request classifier's profile (``archroute-auto``); the choice and the reason are
    logged."""
    candidates = settings.default_candidates()
    if settings.default_profile is not None:
        return candidates[0]
    for name in candidates:
        if name in unserved:
            log.info("model 'archroute': profile %s cannot span-decode here (%s); trying the "
                     "next", name, unserved[name])
            continue
        prof = served[name]
        if prof.span_gate is None:
            log.info("model 'archroute' = profile %s (%s: per-request routing)", name,
                     prof.policy)
        else:
            log.info("model 'archroute' = profile %s (span decoding, gate %s, draft_k %d)",
                     name, prof.span_gate, prof.span_draft[0])
        return name
    return next(iter(served))
