"""Span profiles: requests served by the span decoder (:mod:`models.span.decoder`) over the
router's two backends, a gate choosing the model per token.

A profile with ``policy: span`` (``policy_args: {gate: NAME}``) has no policy to score with:
its requests go to a :class:`~models.span.decoder.SpanBackend` over the configured
transformer and hybrid, built on first use, one per gate (a request may name another gate
with ``"archroute": {"gate": NAME}``), each behind its own :class:`~router.pool.BackendSlot`
(role ``span``) with the transformer's limits. The decoder holds both models' forward locks
while it generates, so span and single-model requests take turns on the models.

A pair that cannot be span-decoded (an upstream, a fake, tokenizers that differ) makes each
request to a span profile a 400 that says why; the rest of the router is unaffected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from models.base import Backend
from models.span.gates import GATES, Gate, UnknownGateError, get_gate
from router.errors import InvalidRequestError
from router.pool import BackendSlot, SlotLimits

SPAN_ROLE = "span"  # the role of span slots (Route.order, BackendSlot.role)
_UNCHECKED = object()


def span_header(span: Mapping[str, object]) -> str:
    """``x-archroute-span``: ``transformer=12; hybrid=30; switches=5; catchup=17; gate=copy-2``
    (only ``gate=...`` before the answer is known, i.e. on a stream)."""
    keys = ("transformer", "hybrid", "switches", "catchup", "gate")
    return "; ".join(f"{k}={span[k]}" for k in keys if k in span)


def span_totals(gate: str, spans: Iterable[Mapping[str, object] | None]) -> dict[str, object]:
    """The span totals of one response (``n`` > 1: summed over its choices)."""
    out: dict[str, object] = {"gate": gate}
    for s in spans:
        for k, v in (s or {}).items():
            if k != "gate" and isinstance(v, int):
                out[k] = int(out.get(k, 0)) + v  # type: ignore[call-overload]
    return out


class SpanService:
    """The span slots of one router, by gate name, built on first use."""

    def __init__(self, transformer: Backend, hybrid: Backend, limits: SlotLimits,
                 gates: Mapping[str, Gate] | None = None) -> None:
        self.transformer = transformer
        self.hybrid = hybrid
        self.limits = limits
        self.gates: dict[str, Gate] = dict(gates or {})  # the profiles' gates, loaded at start
        self.slots: dict[str, BackendSlot] = {}
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

    def _build(self, gate_name: str) -> BackendSlot:
        from models.span.decoder import SpanBackend

        why = self._pair_problem()
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
        backend = SpanBackend(self.transformer, self.hybrid, gate,
                              max_concurrency=self.limits.max_concurrency)
        return BackendSlot(SPAN_ROLE, backend, self.limits)

    async def prepare(self, gate_name: str) -> BackendSlot:
        """The slot of ``gate_name``, built (in a thread: a gate may load a file) on first
        use; a 400 when the pair cannot be span-decoded or the gate does not load."""
        slot = self.slots.get(gate_name)
        if slot is None:
            built = await asyncio.to_thread(self._build, gate_name)
            slot = self.slots.setdefault(gate_name, built)
        return slot

    def slot(self, gate_name: str) -> BackendSlot:
        """The slot :meth:`prepare` built for ``gate_name``."""
        return self.slots[gate_name]
