"""Held-out metrics of a router: AUC, accuracy, Brier score and regret against the oracle.

``p`` is P(transformer serves better) per request; ``gap`` the measured label
(loss_transformer - loss_hybrid, nats/token). AUC, accuracy and Brier are over the
requests beyond the margin (ties have no right answer); regret is over all requests.
"""

from __future__ import annotations

import numpy as np

from classifiers.request import DEFAULT_THRESHOLD
from classifiers.training.labels import MARGIN


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties counted half); NaN when one class is absent."""
    labels = labels.astype(bool)
    n1, n0 = int(labels.sum()), int((~labels).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    ranks = (upper - (counts - 1) / 2.0)[inv]  # average 1-based ranks over ties
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def regret(route_transformer: np.ndarray, gap: np.ndarray) -> float:
    """Mean nats/token lost against the oracle: the gap when the hybrid was better and the
    transformer was chosen, and -gap in the opposite case."""
    chosen_t = np.asarray(route_transformer, bool)
    lost = np.where(chosen_t, np.maximum(gap, 0.0), np.maximum(-gap, 0.0))
    return float(lost.mean()) if len(lost) else float("nan")


def router_metrics(p: np.ndarray, gap: np.ndarray, margin: float = MARGIN,
                   center: float = 0.0, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """auc, accuracy, brier (requests beyond ``margin`` of ``center``), regret and
    routed_transformer (all requests; regret always against the true oracle, gap sign)."""
    p, gap = np.asarray(p, float), np.asarray(gap, float)
    keep = np.abs(gap - center) > margin
    y = (gap[keep] < center).astype(int)  # 1 = transformer better (than center)
    pk = p[keep]
    return {
        "auc": auc(y, pk),
        "accuracy": float(((pk > threshold) == y).mean()) if len(y) else float("nan"),
        "brier": float(((pk - y) ** 2).mean()) if len(y) else float("nan"),
        "regret": regret(p > threshold, gap),
        "routed_transformer": float((p > threshold).mean()),
        "n": int(len(gap)),
        "n_decisive": int(keep.sum()),
    }


def reference_rows(gap: np.ndarray) -> dict[str, dict[str, float]]:
    """Regret of the fixed policies and the oracle (for the results table)."""
    gap = np.asarray(gap, float)
    n = len(gap)
    return {
        "always-transformer": {"regret": regret(np.ones(n, bool), gap), "routed_transformer": 1.0},
        "always-hybrid": {"regret": regret(np.zeros(n, bool), gap), "routed_transformer": 0.0},
        "oracle": {"regret": 0.0, "routed_transformer": float((gap < 0).mean()) if n else 0.0},
    }
