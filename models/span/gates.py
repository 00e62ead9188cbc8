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
(:mod:`models.span.learned`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

Role = Literal["transformer", "hybrid"]
MAX_MATCH = 8  # induction matches are measured up to this many tokens


class UnknownGateError(KeyError, ValueError):
    """No gate of that name (a 400 in the API)."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


class InductionMatcher:
    """Incremental induction matches over a token sequence.

    After each ``push``, ``match_len`` is the largest k <= ``max_k`` such that the last k
    tokens occurred earlier in the sequence (ending before the last position), and
    ``match_dist`` the distance (in tokens) back to the most recent such earlier occurrence
    (0 when ``match_len`` is 0). Cost per token: ``max_k`` dictionary operations.
    """

    def __init__(self, max_k: int = MAX_MATCH) -> None:
        self.max_k = max_k
        self.ids: list[int] = []
        self._last: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_k + 1)]
        self.match_len = 0
        self.match_dist = 0

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        end = len(self.ids)  # the k-gram ending here is ids[end - k:end]
        self.match_len, self.match_dist = 0, 0
        for k in range(1, min(self.max_k, end) + 1):
            gram = tuple(self.ids[end - k:end])
            prev = self._last[k].get(gram)
            if prev is not None:
                self.match_len, self.match_dist = k, end - prev
            self._last[k][gram] = end

    def extend(self, token_ids: Sequence[int]) -> None:
        for t in token_ids:
            self.push(t)


_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = set(_OPEN.values())


class GateState:
    """One sequence's state. Subclasses override :meth:`choose`; the base class keeps the
    induction matcher, the answer's bracket depth, the step count and the last role and
    entropy, which every gate can read."""

    def __init__(self, prompt_ids: Sequence[int], token_text: Callable[[int], str] | None = None,
                 max_k: int = MAX_MATCH) -> None:
        self.matcher = InductionMatcher(max_k)
        self.matcher.extend(prompt_ids)
        self.n_prompt = len(prompt_ids)
        self.step = 0  # answer tokens so far
        self.depth = 0  # brackets opened minus closed in the answer (>= 0)
        self.last_role: Role | None = None
        self.last_entropy: float | None = None
        self.last_token: int | None = prompt_ids[-1] if len(prompt_ids) else None
        self._text = token_text

    def push(self, token_id: int, role: Role, entropy: float | None = None) -> None:
        self.matcher.push(token_id)
        self.step += 1
        self.last_role, self.last_entropy, self.last_token = role, entropy, token_id
        if self._text is not None:
            for ch in self._text(token_id):
                if ch in _OPEN:
                    self.depth += 1
                elif ch in _CLOSE and self.depth > 0:
                    self.depth -= 1

    def choose(self) -> Role:
        raise NotImplementedError


class Gate:
    """A named gate; ``start`` makes a :class:`GateState` per sequence. ``token_text``
    (a token id -> its text) is needed by gates that read brackets."""

    name: str = ""
    needs_text: bool = False

    def start(self, prompt_ids: Sequence[int],
              token_text: Callable[[int], str] | None = None) -> GateState:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Gate({self.name!r})"


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


def _learned(path: str | None = None) -> Gate:
    from models.span.learned import load_learned_gate

    return load_learned_gate(path)


def _copy(k: int, brackets: bool = False) -> Callable[[], Gate]:
    return lambda: CopyGate(k, brackets)


GATES: dict[str, Callable[[], Gate]] = {
    "always-transformer": lambda: _Fixed("transformer"),
    "always-hybrid": lambda: _Fixed("hybrid"),
    "brackets": BracketGate,
    **{f"copy-{k}": _copy(k) for k in range(1, MAX_MATCH + 1)},
    **{f"copy-{k}+brackets": _copy(k, brackets=True) for k in range(1, MAX_MATCH + 1)},
    "learned": _learned,
}


def get_gate(name: str) -> Gate:
    """The gate called ``name`` (``learned:PATH`` loads a learned gate from PATH)."""
    if name.startswith("learned:"):
        return _learned(name.split(":", 1)[1])
    factory = GATES.get(name)
    if factory is None:
        raise UnknownGateError(f"unknown gate {name!r}; known: {', '.join(GATES)} "
                               "(and learned:PATH)")
    return factory()
