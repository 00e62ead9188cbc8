"""What every gate is made of: the gate interface (:class:`Gate`, :class:`GateState`) and
the induction matcher the copy gates and the learned gate share. The gates themselves and
their registry are :mod:`models.span.gates`; the learned gate is :mod:`models.span.learned`
(both build on this module, so neither imports the other's registry)."""

from __future__ import annotations

import math
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
        # how sure the last choose() was: the distance of a scoring gate's score from its
        # decision boundary (nats); infinite for rule gates and for a copy lock's forced choice
        self.margin = math.inf
        # set by choose() when the next token is to be predicted by both models' 50/50
        # mixture instead of the chosen one (MixGate); read by the decoder and by rollout
        self.mix = False
        # and the transformer's weight in that mixture, as log-odds (0: 50/50; MixGate's
        # ``tilt`` leans it toward the side the gate's score is on)
        self.mix_lo = 0.0
        # set by choose() when a copy lock forced the choice (CopyLockGate)
        self.locked = False

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
