"""The oracle: the routing policy that knows each request's measured gap (evals only).

Registered lazily in ``router.policies.LAZY`` as ``"oracle"``; it can only score requests
whose gap it was given, so the router never serves with it. The harness evaluates the same
policy on its tables (:meth:`OraclePolicy.score_table`); both score with
:func:`evals.harness.metrics.oracle_scores`, the one oracle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from classifiers.request import RoutingRequest
from evals.harness import metrics as M
from router.policies import Policy


def request_key(req: RoutingRequest) -> str:
    """A stable key for a request's text (sha1 hex of the joined turns)."""
    return hashlib.sha1(req.text.encode("utf-8")).hexdigest()


class OraclePolicy(Policy):
    """Score = sigmoid(-gap / scale), gap = loss_transformer - loss_hybrid (nats/token).

    ``gaps`` maps :func:`request_key` of a request to its measured gap; positive means the
    hybrid predicted the reference better. At threshold 0.5 every request goes to its better
    backend; sweeping the threshold orders requests by gap. The formula is
    :func:`evals.harness.metrics.oracle_scores`'s (a gap of exactly 0 scores 0.5).
    """

    name = "oracle"
    description = "knows each request's measured gap (evals only)"

    def __init__(self, gaps: Mapping[str, float] | None = None,
                 scale: float = M.ORACLE_SCALE) -> None:
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
        # quality is minus the loss: q_T - q_H = -gap
        return float(M.oracle_scores(np.array([[-self.gaps[key], 0.0]]), scale=self.scale)[0])

    def score_table(self, q: np.ndarray, c: np.ndarray) -> np.ndarray:
        """The scores of every request of a harness table: quality ``q`` (n, 2) and cost
        ``c`` (n, 2), index 0 the transformer (ties to the cheaper backend), shape (n,)."""
        return M.oracle_scores(q, c, self.scale)
