"""Exploration: the share of requests a profile sends to the backend its policy did not pick
(the profile's ``epsilon``), and the propensity of each decision, so that off-policy
evaluation (``archroute eval --from-log``) and the reload gate can weigh logged outcomes.

One seeded generator per router (``exploration_seed``, else a random seed that is logged), so
a run can be replayed.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    """A decision after exploration: the role served, its propensity (the probability this
    router picks that role for the request) and whether it explored."""

    role: str
    propensity: float
    explored: bool


class Explorer:
    """The router's exploration generator."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed if seed is not None else secrets.randbits(32)
        self._rng = random.Random(self.seed)

    def choose(self, picked: str, other: str, epsilon: float, draw: bool = True) -> Choice:
        """The policy ``picked`` a role; with ``epsilon`` > 0, send the request to ``other``
        with that probability. ``draw`` False (a decision only asked about, not served):
        never explore, but report the propensity the served decision would have."""
        if not epsilon:
            return Choice(picked, 1.0, False)
        if draw and self._rng.random() < epsilon:
            return Choice(other, epsilon, True)
        return Choice(picked, 1.0 - epsilon, False)
