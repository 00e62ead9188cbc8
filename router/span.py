"""Span profiles: requests served by the span decoder (:mod:`models.span.decoder`) over the
router's two backends, a gate choosing the model per token.

A profile with ``policy: span`` (``policy_args: {gate: NAME}``) has no policy to score with:
its requests go to a :class:`~models.span.decoder.SpanBackend` over the configured
transformer and hybrid, built on first use, one per gate (a request may name another gate
with ``"archroute": {"gate": NAME}``), each behind its own :class:`~router.pool.BackendSlot`
(role ``span``) with the transformer's limits. The decoder holds both models' forward locks
while it generates, so span and single-model requests take turns on the models.

Two upstreams (OpenAI-compatible engines) are span-decoded by
:class:`~models.span.remote.RemoteSpanBackend`: one completions request per span, token ids
in and out, the stream closed when the gate switches. It needs the engines' tokenizer
locally (``backends.transformer.tokenizer``, a tokenizer directory; the hybrid's, if set,
must split text the same way) and a gate over tokens (``copy-k``, ``brackets``: the learned
gate reads each model's entropy, which the completions API does not return).

A pair that cannot be span-decoded (a fake, an in-process model beside an upstream,
tokenizers that differ, engines without a tokenizer setting, an entropy gate on engines)
makes each request to a span profile a 400 that says why; the rest of the router is
unaffected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from models.base import Backend
from models.span.gates import GATES, Gate, UnknownGateError, get_gate
from router.errors import InvalidRequestError
from router.pool import BackendSlot, SlotLimits

SPAN_ROLE = "span"  # the role of span slots (Route.order, BackendSlot.role)
_UNCHECKED = object()


def span_header(span: Mapping[str, object]) -> str:
    """``x-archroute-span``: ``transformer=12; hybrid=30; switches=5; catchup=17; gate=copy-2``
    (with drafted copy spans ``drafted=40; accepted=31`` after ``catchup``; over two engines ``requests=6; wasted=0`` in place of ``catchup``; only ``gate=...``
    before the answer is known, i.e. on a stream)."""
    keys = ("transformer", "hybrid", "switches", "catchup", "drafted", "accepted", "requests",
            "wasted", "gate")
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


class SpanService:
    """The span slots of one router, by gate name and draft setting, built on first use."""

    def __init__(self, transformer: Backend, hybrid: Backend, limits: SlotLimits,
                 gates: Mapping[str, Gate] | None = None,
                 tokenizers: Mapping[str, str | None] | None = None) -> None:
        self.transformer = transformer
        self.hybrid = hybrid
        # role -> a local tokenizer directory (upstreams: span decoding over engines)
        self.tokenizers = {k: v for k, v in (tokenizers or {}).items() if v}
        self._engine_tokenizer: Any = None
        self.limits = limits
        self.gates: dict[str, Gate] = dict(gates or {})  # the profiles' gates, loaded at start
        self.slots: dict[tuple[str, Draft], BackendSlot] = {}
        self._why: object = _UNCHECKED  # why the pair cannot be span-decoded (None: it can)

    def _pair_problem(self) -> str | None:
        if self._why is _UNCHECKED:
            from models.span.decoder import pair_mismatch

            self._why = pair_mismatch(self.transformer, self.hybrid)
        return self._why  # type: ignore[return-value]

    def check_gate(self, name: str, configured: str) -> None:
        """A 400 unless ``name`` is the profile's gate or a gate of the registry (a request
        cannot make the router load a file: ``learned:PATH`` only from the config)."""
        if name != configured and name not in GATES:
            raise InvalidRequestError(
                f"archroute.gate: unknown gate {name!r}; known gates: {', '.join(GATES)}",
                param="archroute.gate")

    def _engines(self) -> bool:
        from models.upstream import OpenAIUpstreamBackend

        return (isinstance(self.transformer, OpenAIUpstreamBackend)
                and isinstance(self.hybrid, OpenAIUpstreamBackend))

    def _tokenizer(self) -> Any:
        """The engines' shared tokenizer, loaded once from the backends' ``tokenizer``
        setting (both set: they must split text alike); a 400 that says what to set."""
        if self._engine_tokenizer is not None:
            return self._engine_tokenizer
        if not self.tokenizers:
            raise InvalidRequestError(
                "span routing over two engines sends them token ids, so the router needs "
                "their tokenizer: set backends.transformer.tokenizer to a local tokenizer "
                "directory of the engines' model", param="model")
        from transformers import AutoTokenizer

        from models.span.decoder import PROBE

        toks = {}
        for role, path in self.tokenizers.items():
            try:
                toks[role] = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - a bad path: say which
                raise InvalidRequestError(f"backends.{role}.tokenizer: cannot load {path!r} "
                                          f"({type(exc).__name__}: {exc})", param="model") from None
        ids = {r: t(PROBE, add_special_tokens=False)["input_ids"] for r, t in toks.items()}
        if len({tuple(v) for v in ids.values()}) > 1:
            raise InvalidRequestError("span routing needs one tokenizer: the transformer's and "
                                      "the hybrid's split the same text differently", param="model")
        self._engine_tokenizer = next(iter(toks.values()))
        return self._engine_tokenizer

    def _build(self, gate_name: str, draft: Draft = NO_DRAFT) -> BackendSlot:
        from models.span.decoder import IncompatiblePairError, SpanBackend

        engines = self._engines()
        why = None if engines else self._pair_problem()
        if why is not None:
            raise InvalidRequestError(
                f"span routing needs two in-process backends sharing a tokenizer: {why}. "
                "Use another profile, or serve both models in-process (kind: hf)",
                param="model")
        gate = self.gates.get(gate_name)
        if gate is None:
            try:
                gate = get_gate(gate_name)
            except UnknownGateError as exc:
                raise InvalidRequestError(str(exc), param="archroute.gate") from None
            except Exception as exc:  # noqa: BLE001 - e.g. no trained learned gate here
                raise InvalidRequestError(
                    f"archroute.gate: gate {gate_name!r} is not available on this router "
                    f"({type(exc).__name__}: {exc})", param="archroute.gate") from None
            self.gates[gate_name] = gate
        if engines:
            return self._remote_slot(gate)
        try:
            backend = SpanBackend(self.transformer, self.hybrid, gate,
                                  max_concurrency=self.limits.max_concurrency,
                                  draft_k=draft[0], draft_min_match=draft[1])
        except (IncompatiblePairError, ValueError) as exc:  # a draft the pair cannot do
            raise InvalidRequestError(str(exc), param="model") from None
        return BackendSlot(SPAN_ROLE, backend, self.limits)

    def _remote_slot(self, gate: Gate) -> BackendSlot:
        from models.span.remote import RemoteSpanBackend, RemoteSpanError

        tok = self._tokenizer()
        n = getattr(tok, "model_max_length", None)
        try:
            backend = RemoteSpanBackend(
                self.transformer, self.hybrid, tok, gate,  # type: ignore[arg-type]
                context_length=n if isinstance(n, int) and n < 10**7 else None,
                max_concurrency=self.limits.max_concurrency)
        except RemoteSpanError as exc:
            raise InvalidRequestError(str(exc), param="archroute.gate") from None
        return BackendSlot(SPAN_ROLE, backend, self.limits)

    async def prepare(self, gate_name: str, draft: Draft = NO_DRAFT) -> BackendSlot:
        """The slot of ``gate_name`` with ``draft``, built (in a thread: a gate may load a
        file) on first use; a 400 when the pair cannot be span-decoded or the gate does not
        load. Over two engines ``draft`` does not apply (the engines decode the spans)."""
        key = (gate_name, draft if not self._engines() else NO_DRAFT)
        slot = self.slots.get(key)
        if slot is None:
            built = await asyncio.to_thread(self._build, *key)
            slot = self.slots.setdefault(key, built)
        return slot

    def slot(self, gate_name: str, draft: Draft = NO_DRAFT) -> BackendSlot:
        """The slot :meth:`prepare` built for ``gate_name`` and ``draft``."""
        return self.slots[(gate_name, draft if not self._engines() else NO_DRAFT)]

    def why_not(self, gate_name: str, draft: Draft = NO_DRAFT) -> str | None:
        """Why this router cannot span-decode with ``gate_name`` (None: it can; the slot is
        then built and kept). Called at start, before the loop serves, to resolve what
        ``model: "archroute"`` means."""
        key = (gate_name, draft if not self._engines() else NO_DRAFT)
        if key in self.slots:
            return None
        try:
            self.slots[key] = self._build(*key)
        except InvalidRequestError as exc:
            return str(exc)
        return None
