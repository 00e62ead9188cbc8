"""Routing resolution: what serves one request, decided by small resolvers.

:meth:`router.serving.RouterService.route` asks them in order; the first that applies
returns the request's :class:`Resolution`, an immutable decision that is then written into
the request's record (:class:`~router.decision_log.DecisionRow`):

1. :func:`named_backend`: the model names a backend (routing bypassed);
2. :func:`side_request`: a chat app's side request (title, tags, follow-ups), served by the
   ``side_requests`` backend unscored;
3. :func:`span_profile`: a span profile, decoded by the span decoder with its gate (or the
   one the request names);
4. :func:`scored`: the profile's policy scores the request, :func:`router.policies.decide`
   compares the score with the threshold, a follow-up turn stays on the earlier turn's
   backend unless the predicted gain beats the handoff cost (:mod:`router.conversations`),
   and exploration may send it to the other backend.

A resolver reads what it needs and changes nothing but the exploration generator's state
(:mod:`router.learning.exploration`) and the span slots it builds on first use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

from classifiers.explain import reasons as feature_reasons
from classifiers.request import RoutingRequest
from router.conversations import Earlier, Sticky, stick
from router.decision_log import DecisionRow
from router.errors import InvalidRequestError
from router.learning.exploration import Explorer
from router.policies import Policy, decide
from router.probing import ProbeOutcome
from router.settings import ProfileSettings
from router.side import is_side_request
from router.span import NO_DRAFT, SPAN_ROLE, Draft, SpanService

INLINE_SCORE_CHARS = 20_000  # cheap policies score shorter texts on the loop itself


def other_role(role: str) -> str:
    return "hybrid" if role == "transformer" else "transformer"


@dataclass(frozen=True)
class Ask:
    """What one request asks of routing: the model (a backend, or a profile already resolved
    from an alias or a deprecated name), the request as the policy sees it, and the
    request's ``archroute`` options. ``count`` False: a decision only asked about
    (``/v1/route``), never explored nor counted."""

    model: str
    rreq: RoutingRequest
    threshold: float | None = None
    explain: bool = False
    count: bool = True
    gate: str | None = None
    earlier: Earlier | None = None  # a follow-up turn: the turn before (router/conversations.py)


@dataclass(frozen=True)
class Resolution:
    """One request's routing decision. ``role`` is what serves it first (``transformer``,
    ``hybrid`` or ``span``); ``policy`` is what the record names (None: routing bypassed);
    ``counted`` the policy label of the decisions metric (None: not counted)."""

    role: str
    profile: str | None = None
    policy: str | None = None
    side: bool = False
    score: float | None = None
    threshold: float | None = None
    features: Mapping[str, float] = field(default_factory=dict)
    propensity: float = 1.0  # P(this router picks `role` for the request)
    explored: bool = False
    artifact: str | None = None  # the classifier artifact that scored it (12 hex digits)
    reasons: tuple[str, ...] | None = None  # the decision in words (explain)
    span_gate: str | None = None  # a span profile's gate
    span_draft: Draft = NO_DRAFT  # a span profile's drafted copy spans (draft_k, min_match)
    counted: str | None = None
    fallback: bool = True  # False: only ``role`` may serve it (a backend named directly)
    # a ``needs_probe`` policy's prompt probe: how long it took (ms; also the record's
    # ``probe_ms`` feature) and why it failed (None: measured, or not asked)
    probe_ms: float | None = None
    probe_failure: str | None = None
    sticky: bool = False  # the profile keeps conversations on a backend: remember this turn
    conversation: Sticky | None = None  # a follow-up turn's stay-or-switch decision

    def record(self, row: DecisionRow) -> None:
        """Write the decision into the request's record."""
        row.profile, row.policy, row.decision, row.side = (self.profile, self.policy,
                                                           self.role, self.side)
        row.score, row.threshold, row.features = self.score, self.threshold, dict(self.features)
        row.propensity, row.explored, row.artifact = self.propensity, self.explored, self.artifact
        row.conversation = None if self.conversation is None else self.conversation.record()


def named_backend(ask: Ask, by_name: Mapping[str, str]) -> Resolution | None:
    """The model names a backend (``by_name``: backend name -> role): routing bypassed."""
    role = by_name.get(ask.model)
    if role is None:
        return None
    return Resolution(role, fallback=False, reasons=(
        "the model names a backend: routing bypassed",) if ask.explain else None)


def check_gate(ask: Ask, name: str, prof: ProfileSettings) -> None:
    """A request's ``archroute.gate`` applies to span profiles only: a 400 elsewhere."""
    if ask.gate is not None and prof.span_gate is None:
        raise InvalidRequestError(
            f"archroute.gate: profile {name!r} routes whole requests; a gate applies to "
            "span profiles (policy: span) only", param="archroute.gate")


def side_request(ask: Ask, name: str, side: str) -> Resolution | None:
    """A chat app's side request, served by ``side`` (settings ``side_requests``: a role;
    ``route`` routes them like any request) without scoring."""
    if side == "route" or ask.rreq.kind != "chat" or not is_side_request(ask.rreq.last_user):
        return None
    return Resolution(side, name, "side-request", side=True, reasons=(
        f"a chat app's side request (title, tags, follow-ups): served by the {side} without "
        "scoring",) if ask.explain else None)


async def span_profile(ask: Ask, name: str, prof: ProfileSettings,
                       span: SpanService) -> Resolution | None:
    """A span profile: the span decoder with the profile's gate, or a gate the request
    names (a 400 when unknown, or when this pair cannot span-decode with it)."""
    if prof.span_gate is None:
        return None
    chosen = prof.span_gate if ask.gate is None else ask.gate
    span.check_gate(chosen, prof.span_gate)
    await span.prepare(chosen, prof.span_draft)  # a 400 when it cannot span
    return Resolution(SPAN_ROLE, name, prof.policy, span_gate=chosen, span_draft=prof.span_draft,
                      counted=prof.policy if ask.count else None,
                      reasons=(f"span decoding: the gate {chosen} picks the model for each "
                               "token",) if ask.explain else None)


Prober = Callable[[RoutingRequest], Awaitable[ProbeOutcome]]


async def scored(ask: Ask, name: str, prof: ProfileSettings, policy: Policy, threshold: float,
                 explorer: Explorer, probe: Prober | None = None) -> Resolution:
    """The profile's policy scores the request (in a worker thread when it may take over a
    millisecond, or the text is long), the threshold decides, and with the profile's
    ``epsilon`` exploration may send it to the other backend (only when ``ask.count``). A
    follow-up turn (``ask.earlier``) of a profile with ``conversation.sticky`` stays on the
    earlier backend unless the policy's gain beats the handoff cost, before exploration."""
    # a ``needs_probe`` policy gets the prompt probe first (``probe``: both backends'
    # prefill, router/probing.py); when it fails the policy scores without it (its
    # prompt-only classifier), against that one's threshold unless the profile or the
    # request sets one
    rreq, outcome = ask.rreq, None
    if policy.needs_probe and probe is not None:
        outcome = await probe(rreq)
        if outcome.features is not None:
            rreq = replace(rreq, probe=outcome.features)
    if policy.blocking or policy.needs_probe or len(rreq.text) > INLINE_SCORE_CHARS:
        score, feats = await asyncio.to_thread(policy.explain, rreq)
    else:
        score, feats = policy.explain(rreq)
    thr = threshold if ask.threshold is None else ask.threshold
    failed = outcome is not None and outcome.features is None
    fallback_thr = policy.threshold_without_probe() if failed else None
    if fallback_thr is not None and ask.threshold is None and prof.threshold is None:
        thr = fallback_thr
    if outcome is not None:
        feats = {**feats, "probe_ms": round(outcome.ms, 3)}
    picked: str = decide(score, thr)
    conv = prof.conversation
    sticky = None
    if conv.sticky and ask.earlier is not None:
        sticky = stick(ask.earlier, picked, policy.gain(score, thr), conv.handoff_cost)
        picked = sticky.role
    choice = explorer.choose(picked, other_role(picked), prof.epsilon, draw=ask.count)
    identity = policy.artifact_identity()
    sha = identity.get("sha256") if identity else None
    why: tuple[str, ...] | None = None
    if ask.explain:
        why = tuple(feature_reasons(feats, policy.contributions(feats)))
        if sticky is not None and sticky.outcome != "same":
            why += (f"a follow-up turn: predicted gain {sticky.gain:.4f} nats/token for the "
                    f"{sticky.picked} {'beats' if sticky.outcome == 'switched' else 'is below'}"
                    f" the handoff cost {sticky.handoff_cost:.4f} ({sticky.tokens} tokens on "
                    f"the {sticky.earlier}): {sticky.outcome}",)
        if choice.explored:
            why += (f"exploration (epsilon {prof.epsilon:g}): sent to the {choice.role}, the "
                    "backend the policy did not pick",)
    if failed and why is not None:
        assert outcome is not None
        why += (f"the prompt probe failed ({outcome.failure}: {outcome.detail}): scored by "
                "the prompt-only classifier",)
    # a classifier profile without its artifact scores with the rules: say so
    label = f"{prof.policy}+rules-fallback" if policy.fallback_ else prof.policy
    if failed:  # a probe profile whose probe failed: scored without it
        label = f"{prof.policy}+prompt-only"
    return Resolution(choice.role, name, label, score=score, threshold=thr, features=feats,
                      propensity=choice.propensity, explored=choice.explored,
                      artifact=sha[:12] if isinstance(sha, str) and sha else None,
                      probe_ms=None if outcome is None else outcome.ms,
                      probe_failure=None if outcome is None else outcome.failure,
                      reasons=why, counted=prof.policy if ask.count else None,
                      sticky=conv.sticky, conversation=sticky)
