"""Gates: at each step of an answer, which model predicts the next token.

A gate is causal: it sees the token ids so far (prompt and the answer generated so far), who
produced each answer token, and the entropy of the producing model's distribution at each
step, never the token it is about to predict. The same gate object drives teacher-forced
evaluation (``evals.span``) and generation (``models.span.decoder``), so the two cannot
disagree.

Interface: ``gate.start(prompt_ids)`` returns a fresh :class:`GateState` for one sequence;
``state.choose()`` names the role for the next token; ``state.push(token_id, role,
entropy)`` records the token that was produced (by ``role``, whose distribution had that
``entropy`` in nats; None when unknown).

Registry: ``GATES`` maps names to factories; ``get_gate("copy-2")``. Names:
``copy-k`` (k = 1..8): the transformer while the last k tokens occurred earlier in the
sequence (an induction match: the answer may be copying), the hybrid otherwise;
``brackets``: the transformer while a bracket is open in the answer (it must be closed),
else the hybrid; ``copy-k+brackets``: either rule; ``always-transformer`` and
``always-hybrid``; ``learned`` (and ``learned:PATH``): the learned gate
(:mod:`models.span.learned`); ``learned-topk``: the learned gate trained on the top-5
entropy proxy, for span decoding over two engines (``models/span/topk_gate``);
``learned+copy-k`` (k = 2, 4, 8) and ``learned-topk+copy-4``: those gates with a copy lock
(:class:`CopyLockGate`: the transformer while an induction match of length >= k holds);
``learned+copy-8-prompt-2``: the lock at 8 tokens, or at 2 where the last two tokens occur
in the prompt (``archroute``'s gate in-process). Any registered gate may be followed by
wrappers in its name: ``+copy-K[-prompt-P]`` (a copy lock) and ``+mix-M[-prompt-P][-repeat-K][-tilt-B][-lock-L]``
(:class:`MixGate`: a mixture of both models where the gate's score is within M nats
of its boundary, 50/50 or, with ``-tilt-B``, leaning toward the gate's side; with
``-prompt-P`` not where the last P tokens repeat the prompt),
e.g. ``learned+copy-8-prompt-2+mix-2-tilt-1.5``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from models.span.gate_base import (  # noqa: F401 - re-exported: the gates' API
    _CLOSE,
    _OPEN,
    MAX_MATCH,
    Gate,
    GateState,
    InductionMatcher,
    Role,
    UnknownGateError,
)


class _Fixed(Gate):
    def __init__(self, role: Role) -> None:
        self.role: Role = role
        self.name = f"always-{role}"

    def start(self, prompt_ids, token_text=None) -> GateState:
        role = self.role

        class S(GateState):
            def choose(self) -> Role:
                return role

        return S(prompt_ids, token_text)


class CopyGate(Gate):
    """The transformer while the last ``k`` tokens occurred earlier (an induction match of
    length >= k); with ``brackets``, also while a bracket is open in the answer."""

    def __init__(self, k: int, brackets: bool = False) -> None:
        if not 1 <= k <= MAX_MATCH:
            raise ValueError(f"copy-k: k must be in 1..{MAX_MATCH}, got {k}")
        self.k = k
        self.brackets = brackets
        self.needs_text = brackets
        self.name = f"copy-{k}" + ("+brackets" if brackets else "")

    def start(self, prompt_ids, token_text=None) -> GateState:
        k, brackets = self.k, self.brackets

        class S(GateState):
            def choose(self) -> Role:
                if self.matcher.match_len >= k or (brackets and self.depth > 0):
                    return "transformer"
                return "hybrid"

        return S(prompt_ids, token_text)


class BracketGate(Gate):
    """The transformer while a bracket is open in the answer (the study: transformers win on
    closing brackets), the hybrid otherwise."""

    name = "brackets"
    needs_text = True

    def start(self, prompt_ids, token_text=None) -> GateState:
        class S(GateState):
            def choose(self) -> Role:
                return "transformer" if self.depth > 0 else "hybrid"

        return S(prompt_ids, token_text)


class CopyLockGate(Gate):
    """``inner``'s choice, except the transformer while the last ``k`` tokens occurred
    earlier (an induction match of length >= k): a copy under way is never handed to the
    model that cannot copy. Teacher-forced loss does not see why this matters (one wrong
    token inside a copy costs its own loss there); in generation that token derails the
    rest of the copy. ``inner`` is still asked at every step, so its own state moves on.

    ``prompt`` (< k, optional): a shorter match suffices when the last ``prompt`` tokens
    occur in the prompt followed by a prompt token (the answer is copying the user's text:
    a fix, a rename, a quote), whether or not the answer repeated them since; a repeat of the
    answer's own text alone needs ``k``."""

    def __init__(self, inner: Gate, k: int, prompt: int | None = None) -> None:
        if not 1 <= k <= MAX_MATCH:
            raise ValueError(f"+copy-k: k must be in 1..{MAX_MATCH}, got {k}")
        if prompt is not None and not 1 <= prompt < k:
            raise ValueError(f"+copy-k-prompt-p: p must be in 1..{k - 1}, got {prompt}")
        self.inner, self.k, self.prompt = inner, k, prompt
        self.needs_text = inner.needs_text
        self.name = f"{inner.name}+copy-{k}" + (f"-prompt-{prompt}" if prompt else "")
        # the inner gate's artifact: its training sources (span-eval's in-sample check) and
        # its entropy kind (over engines: models.span.remote.entropy_topk)
        self.meta = getattr(inner, "meta", None)

    def start(self, prompt_ids, token_text=None) -> GateState:
        state = self.inner.start(prompt_ids, token_text)
        inner_choose, k = state.choose, self.k
        pk = self.prompt
        ids = list(prompt_ids)
        # the prompt's pk-grams that a prompt token follows (not the prompt's own last one)
        grams = {tuple(ids[i:i + pk]) for i in range(len(ids) - pk)} if pk else set()

        def choose() -> Role:
            role = inner_choose()
            m = state.matcher.match_len
            state.locked = False
            if m >= k or (pk is not None and m >= pk
                          and tuple(state.matcher.ids[-pk:]) in grams):
                state.margin = math.inf  # a copy under way: sure
                state.locked = True
                return "transformer"
            return role

        state.choose = choose  # type: ignore[method-assign]
        return state


class MixGate(Gate):
    """``inner``'s choice, but a token whose choice was unsure (the inner gate's score within
    ``margin`` nats of its decision boundary) is predicted by a mixture of both models
    (``state.mix``): both decode it, their distributions averaged. A choice of one model per
    token cannot hedge where the two disagree and neither is sure; the mixture does
    (docs/span.md, "Why a choice of one model per token falls short of the mixture"). Rule
    gates and a copy lock's forced choices are always sure, so they never mix. In-process
    only: over engines the full distributions are not available.

    ``tilt`` (B >= 0; 0 = the 50/50 mixture): the transformer's weight in the mixture is
    ``sigmoid(B * s)``, ``s`` the gate's score minus its boundary (nats, positive on the
    transformer's side; ``state.mix_lo = B * s``): the mixture leans toward the model the
    gate prefers, as far as its score says. ``repeat`` (K): no mixing where the last K tokens
    occurred before. ``lock`` (L > 0): a copy lock's forced token is mixed too, with the
    transformer's log-odds L."""

    def __init__(self, inner: Gate, margin: float, prompt: int | None = None,
                 tilt: float = 0.0, repeat: int | None = None,
                 lock: float | None = None) -> None:
        if not (isinstance(margin, (int, float)) and 0.0 < margin <= MAX_MIX_MARGIN):
            raise ValueError(f"+mix-m: m must be a number in (0, {MAX_MIX_MARGIN}], got {margin!r}")
        if prompt is not None and not 1 <= prompt <= MAX_MATCH:
            raise ValueError(f"+mix-m-prompt-p: p must be in 1..{MAX_MATCH}, got {prompt!r}")
        if not (isinstance(tilt, (int, float)) and 0.0 <= tilt <= MAX_MIX_TILT):
            raise ValueError(f"+mix-m-tilt-b: b must be a number in [0, {MAX_MIX_TILT}], "
                             f"got {tilt!r}")
        if repeat is not None and not 1 <= repeat <= MAX_MATCH:
            raise ValueError(f"+mix-m-repeat-k: k must be in 1..{MAX_MATCH}, got {repeat!r}")
        if lock is not None and not (isinstance(lock, (int, float))
                                     and 0.0 < lock <= MAX_MIX_TILT):
            raise ValueError(f"+mix-m-lock-l: l must be a number in (0, {MAX_MIX_TILT}], "
                             f"got {lock!r}")
        self.inner, self.mix_margin, self.prompt = inner, float(margin), prompt
        self.tilt, self.repeat, self.lock = float(tilt), repeat, lock
        self.needs_text = inner.needs_text
        self.name = (f"{inner.name}+mix-{margin:g}" + (f"-prompt-{prompt}" if prompt else "")
                     + (f"-repeat-{repeat}" if repeat else "")
                     + (f"-tilt-{tilt:g}" if tilt else "")
                     + (f"-lock-{lock:g}" if lock else ""))
        self.meta = getattr(inner, "meta", None)

    def start(self, prompt_ids, token_text=None) -> GateState:
        state = self.inner.start(prompt_ids, token_text)
        inner_choose, m, pk, tilt = state.choose, self.mix_margin, self.prompt, self.tilt
        rk, lock = self.repeat, self.lock

        def choose() -> Role:
            state.margin = math.inf
            role = inner_choose()
            mt = state.matcher
            # prompt=P: never mix where the last P tokens repeat the prompt (a copy may be
            # starting: the mixture could pick another token than the copy's)
            starting = pk is not None and mt.match_len >= pk and mt.match_dist > state.step
            # repeat=K: nor where the last K tokens occurred anywhere before (the answer may
            # be repeating itself or the prompt: a copy the transformer drafts)
            starting = starting or (rk is not None and mt.match_len >= rk)
            state.mix = state.margin < m and not starting
            state.mix_lo = (tilt * (state.margin if role == "transformer" else -state.margin)
                            if state.mix else 0.0)
            if lock is not None and getattr(state, "locked", False):
                # lock=L: a locked copy's token too, by the mixture with the transformer's
                # log-odds L (it leans on the copy; the hybrid can still save a wrong one)
                state.mix, state.mix_lo = True, lock
            return role

        state.choose = choose  # type: ignore[method-assign]
        return state


MAX_MIX_MARGIN = 10.0  # nats
MAX_MIX_TILT = 10.0  # per nat


def wrap(gate: Gate, wrappers: str) -> Gate:
    """``gate`` with the wrappers a name's tail spells, in order: ``+copy-K``,
    ``+copy-K-prompt-P`` (:class:`CopyLockGate`) and ``+mix-M[-prompt-P][-repeat-K][-tilt-B][-lock-L]``
    (:class:`MixGate`);
    a ValueError naming the part it cannot read."""
    import re

    for part in filter(None, wrappers.split("+")):
        if (m := re.fullmatch(r"copy-(\d+)(?:-prompt-(\d+))?", part)):
            gate = CopyLockGate(gate, int(m[1]), int(m[2]) if m[2] else None)
        elif (m := re.fullmatch(r"mix-(\d+(?:\.\d+)?)(?:-prompt-(\d+))?(?:-repeat-(\d+))?"
                                r"(?:-tilt-(\d+(?:\.\d+)?))?(?:-lock-(\d+(?:\.\d+)?))?",
                                part)):
            gate = MixGate(gate, float(m[1]), int(m[2]) if m[2] else None,
                           float(m[4]) if m[4] else 0.0, int(m[3]) if m[3] else None,
                           float(m[5]) if m[5] else None)
        else:
            raise ValueError(f"unknown gate wrapper {part!r} (known: +copy-K, "
                             "+copy-K-prompt-P, +mix-M[-prompt-P][-repeat-K][-tilt-B][-lock-L])")
    return gate


def _learned(path: str | None = None) -> Gate:
    from models.span.learned import load_learned_gate

    return load_learned_gate(path)


def _learned_topk() -> Gate:
    from models.span.learned import TOPK_DIR, load_learned_gate

    return load_learned_gate(TOPK_DIR, name="learned-topk")


def _copy(k: int, brackets: bool = False) -> Callable[[], Gate]:
    return lambda: CopyGate(k, brackets)


def _locked(inner: Callable[[], Gate], k: int,
            prompt: int | None = None) -> Callable[[], Gate]:
    return lambda: CopyLockGate(inner(), k, prompt)


GATES: dict[str, Callable[[], Gate]] = {
    "always-transformer": lambda: _Fixed("transformer"),
    "always-hybrid": lambda: _Fixed("hybrid"),
    "brackets": BracketGate,
    **{f"copy-{k}": _copy(k) for k in range(1, MAX_MATCH + 1)},
    **{f"copy-{k}+brackets": _copy(k, brackets=True) for k in range(1, MAX_MATCH + 1)},
    "learned": _learned,
    "learned-topk": _learned_topk,  # the learned gate for two engines (top-5 entropy proxy)
    # the learned gates with a copy lock (CopyLockGate): the transformer while a copy is under way
    # (a few k: every registered gate is rolled out by span-eval by default)
    **{f"learned+copy-{k}": _locked(_learned, k) for k in (2, 4, 8)},
    # archroute's gate in-process: a 2-token match copying the prompt, 8 otherwise
    "learned+copy-8-prompt-2": _locked(_learned, 8, 2),
    "learned-topk+copy-4": _locked(_learned_topk, 4),
}


def _split(name: str) -> tuple[str, str] | None:
    """(registered gate, wrappers) for a registered name with wrappers after it."""
    base = next((b for b in sorted(GATES, key=len, reverse=True) if name.startswith(b + "+")),
                None)
    return None if base is None else (base, name[len(base):])


def known_gate(name: str) -> bool:
    """Whether ``name`` is a registered gate, or one followed by wrappers that parse
    (``+copy-K``, ``+copy-K-prompt-P``, ``+mix-M[-prompt-P][-repeat-K][-tilt-B][-lock-L]``); loads no artifact."""
    if name in GATES:
        return True
    parts = _split(name)
    if parts is None:
        return False
    try:
        wrap(CopyGate(1), parts[1])
    except ValueError:
        return False
    return True


def get_gate(name: str) -> Gate:
    """The gate called ``name`` (``learned:PATH`` loads a learned gate from PATH)."""
    if name.startswith("learned:"):
        return _learned(name.split(":", 1)[1])
    factory = GATES.get(name)
    if factory is None:
        # a registered gate with wrappers after it: "learned+copy-8-prompt-2+mix-0.5"
        parts = _split(name)
        if parts is not None:
            try:
                return wrap(GATES[parts[0]](), parts[1])
            except ValueError as exc:
                raise UnknownGateError(f"gate {name!r}: {exc}") from None
        raise UnknownGateError(f"unknown gate {name!r}; known: {', '.join(GATES)} "
                               "(and learned:PATH; a gate followed by +copy-K, "
                               "+copy-K-prompt-P or +mix-M[-prompt-P][-repeat-K][-tilt-B][-lock-L])")
    return factory()
