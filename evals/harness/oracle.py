"""The oracle: the routing policy that knows each request's measured gap (evals only).

Registered lazily in ``router.policies.LAZY`` as ``"oracle"``; it can only score requests
whose gap it was given, so the router never serves with it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

from classifiers.request import RoutingRequest
from router.policies import Policy


def request_key(req: RoutingRequest) -> str:
    """A stable key for a request's text (sha1 hex of the joined turns)."""
    return hashlib.sha1(req.text.encode("utf-8")).hexdigest()


class OraclePolicy(Policy):
    """Score = sigmoid(-gap / scale), gap = loss_transformer - loss_hybrid (nats/token).

    ``gaps`` maps :func:`request_key` of a request to its measured gap; positive means the
    hybrid predicted the reference better. At threshold 0.5 every request goes to its better
    backend; sweeping the threshold orders requests by gap.
    """

    name = "oracle"
    description = "knows each request's measured gap (evals only)"

    def __init__(self, gaps: Mapping[str, float] | None = None, scale: float = 0.1) -> None:
        if scale <= 0:
            raise ValueError(f"oracle: scale must be > 0, got {scale}")
        self.gaps = dict(gaps or {})
        self.scale = scale

    def params(self) -> dict[str, object]:
        return {"scale": self.scale, "n_gaps": len(self.gaps)}

    def score(self, req: RoutingRequest) -> float:
        key = request_key(req)
        if key not in self.gaps:
            raise KeyError("oracle: no measured gap for this request (the oracle only scores "
                           "requests of an evaluated suite)")
        z = max(-50.0, min(50.0, -self.gaps[key] / self.scale))
        return 1.0 / (1.0 + math.exp(-z))
