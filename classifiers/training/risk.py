"""Thresholds with a finite-sample guarantee (issue #16, item 5).

The router sends a request to the transformer when P(transformer better) >= t, else to the
hybrid, the cheaper backend (no KV cache in 3 of 4 layers). Raising t saves more; the risk
is sending a request to the hybrid where the transformer was clearly better. For a risk
level ``alpha`` and confidence ``1 - delta`` we want the largest t whose risk on new
requests is at most ``alpha`` with probability at least ``1 - delta`` over the calibration
sample. Two risks, two methods:

- ``rate``: the share of requests routed to the hybrid while the transformer was better by
  more than ``margin`` nats/token (a *violation*). Binary per request, so its upper
  confidence bound is exact: Clopper-Pearson. The threshold is found by fixed-sequence
  testing (Learn-then-Test, Angelopoulos et al. 2021): thresholds are tested from the
  safest (0: everything to the transformer, no violation) upwards, and the scan stops at
  the first one whose bound exceeds ``alpha``; because the violation count can only grow
  with t, this controls the family-wise error at ``delta`` without a multiplicity penalty.
- ``mean``: the mean quality lost against the transformer, in nats/token, per request
  (``max(0, loss_hybrid - loss_transformer)`` when routed to the hybrid; gains are not
  counted, so the bound is conservative), clipped at ``bound``. Conformal risk control
  (Angelopoulos et al. 2022): the largest t with ``(n R(t) + bound) / (n + 1) <= alpha``
  has expected risk <= alpha on an exchangeable new request (in expectation over the
  calibration sample: no delta).

Both assume the new requests are exchangeable with the calibration ones (same mix of
sources). Across sources they are not; :func:`validate` measures what holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MARGIN = 0.05  # nats/token: a violation is a loss larger than this (the label tie margin)
RISK_ALPHAS = (0.05, 0.1, 0.2)  # the artifact's `risk-ALPHA` thresholds
RISK_DELTA = 0.05


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided (1 - delta) upper bound on a binomial rate, k successes in n trials."""
    from scipy.stats import beta

    if n == 0:
        return 1.0
    return 1.0 if k >= n else float(beta.ppf(1 - delta, k + 1, n - k))


def _candidates(p: np.ndarray) -> np.ndarray:
    """Thresholds between distinct scores, ascending, starting at 0 (all to the transformer:
    routes p >= t there, so t = 0 sends everything to the transformer)."""
    u = np.unique(p)
    mids = (u[:-1] + u[1:]) / 2 if len(u) > 1 else np.zeros(0)
    return np.concatenate(([0.0], mids, [float(u[-1]) + 1e-9] if len(u) else []))


def violations(p: np.ndarray, t: float, lt: np.ndarray, lh: np.ndarray,
               margin: float = MARGIN) -> np.ndarray:
    """Per request: routed to the hybrid while the transformer was better by > margin."""
    return (p < t) & (lh - lt > margin)


def quality_lost(p: np.ndarray, t: float, lt: np.ndarray, lh: np.ndarray,
                 bound: float = 5.0) -> np.ndarray:
    """Per request: nats/token lost against the transformer by routing (>= 0, <= bound)."""
    return np.where(p < t, np.clip(lh - lt, 0.0, bound), 0.0)


def rate_threshold(p: np.ndarray, lt: np.ndarray, lh: np.ndarray, alpha: float,
                   delta: float = 0.05, margin: float = MARGIN) -> float:
    """The largest threshold whose violation rate is <= alpha with probability >= 1 - delta
    (Clopper-Pearson bounds, fixed-sequence testing from the safe end); 0 when none is."""
    if not 0 < alpha < 1 or not 0 < delta < 1:
        raise ValueError(f"alpha and delta must be in (0, 1), got {alpha}, {delta}")
    n = len(p)
    order = np.argsort(p)
    bad = (lh - lt > margin)[order]
    ps = p[order]
    cum = np.concatenate(([0], np.cumsum(bad)))  # violations when the j lowest go to hybrid
    best = 0.0
    for t in _candidates(p):
        j = int(np.searchsorted(ps, t, side="left"))  # requests with p < t
        if clopper_pearson_upper(int(cum[j]), n, delta) > alpha:
            break
        best = float(t)
    return best


def crc_threshold(p: np.ndarray, lt: np.ndarray, lh: np.ndarray, alpha: float,
                  bound: float = 5.0) -> float:
    """Conformal risk control: the largest threshold with (n R(t) + bound) / (n + 1) <= alpha,
    R the mean quality lost (:func:`quality_lost`); 0 when none is."""
    n = len(p)
    order = np.argsort(p)
    lost = np.clip(lh - lt, 0.0, bound)[order]
    ps = p[order]
    cum = np.concatenate(([0.0], np.cumsum(lost)))
    best = 0.0
    for t in _candidates(p):
        j = int(np.searchsorted(ps, t, side="left"))
        if (cum[j] + bound) / (n + 1) > alpha:
            break
        best = float(t)
    return best


@dataclass
class ValidationRow:
    method: str
    alpha: float
    delta: float
    n_cal: int
    n_test: int
    mean_threshold: float
    mean_risk: float  # realised on the test half, averaged over repetitions
    p90_risk: float
    exceed_share: float  # repetitions whose realised risk exceeded alpha
    hybrid_share: float  # requests routed to the hybrid (what the threshold buys)


def validate(p: np.ndarray, lt: np.ndarray, lh: np.ndarray, alphas=(0.05, 0.1, 0.2),
             delta: float = 0.05, reps: int = 200, n_cal: int = 2000, seed: int = 0,
             margin: float = MARGIN, bound: float = 5.0) -> list[ValidationRow]:
    """Draw ``n_cal`` calibration requests at random, pick the threshold on them, measure the
    realised risk on every other request (the held-out rows, much larger, so their own
    sampling error is small). ``rate``: the realised violation rate should exceed alpha in
    at most about ``delta`` of the repetitions; ``mean``: the realised mean loss should
    average at most alpha (conformal risk control bounds the expectation only)."""
    rng = np.random.default_rng(seed)
    n = len(p)
    cal_share = n_cal / n
    out = []
    for method in ("rate", "mean"):
        for a in alphas:
            ts, risks, shares = [], [], []
            for _ in range(reps):
                perm = rng.permutation(n)
                c, te = perm[: int(cal_share * n)], perm[int(cal_share * n):]
                if method == "rate":
                    t = rate_threshold(p[c], lt[c], lh[c], a, delta, margin)
                    r = violations(p[te], t, lt[te], lh[te], margin).mean()
                else:
                    t = crc_threshold(p[c], lt[c], lh[c], a, bound)
                    r = quality_lost(p[te], t, lt[te], lh[te], bound).mean()
                ts.append(t)
                risks.append(r)
                shares.append(float((p[te] < t).mean()))
            risks_a = np.array(risks)
            out.append(ValidationRow(method, a, delta if method == "rate" else float("nan"),
                                     len(c), len(te), float(np.mean(ts)),
                                     float(risks_a.mean()), float(np.quantile(risks_a, 0.9)),
                                     float((risks_a > a).mean()), float(np.mean(shares))))
    return out


def by_source(p: np.ndarray, lt: np.ndarray, lh: np.ndarray, groups: np.ndarray,
              alpha: float, delta: float = 0.05, eval_only: tuple[str, ...] = (),
              margin: float = MARGIN) -> dict[str, tuple[float, float]]:
    """Calibrate on every other source, measure on one: {source: (violation rate, share to
    the hybrid)}. What the guarantee is worth when traffic is not exchangeable with the
    calibration mix. Evaluation-only sources are never calibrated on."""
    out = {}
    for s in sorted(set(groups)):
        cal = (groups != s) & ~np.isin(groups, list(eval_only))
        te = groups == s
        t = rate_threshold(p[cal], lt[cal], lh[cal], alpha, delta, margin)
        out[str(s)] = (float(violations(p[te], t, lt[te], lh[te], margin).mean()),
                       float((p[te] < t).mean()))
    return out
