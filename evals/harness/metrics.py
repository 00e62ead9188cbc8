"""Routing metrics on a two-backend table: sweeps, frontiers, areas, oracle gap, CIs.

Inputs are per-request arrays of length n, index 0 = transformer, 1 = hybrid:
``q`` (n, 2) quality, higher is better (e.g. minus the reference's mean loss, nats/token);
``c`` (n, 2) cost, lower is better (FLOPs, bytes, ms or $ per request); ``scores`` (n,)
a policy's P(transformer better). A threshold ``t`` routes a request to the transformer
iff ``score >= t`` (the router's shared ``decide``). Every quality and cost below is a
mean per request.

- sweep: one point per distinct threshold, from "all hybrid" to "all transformer".
- APGR (RouteLLM): area under PGR(x), x = share of requests sent to the higher-quality
  single backend ("strong"), PGR = (Q - Q_weak) / (Q_strong - Q_weak); random mixing = 0.5.
- AIQ (RouterBench): mean over the cost interval between the two single backends of the
  non-decreasing upper convex hull of the curve's points (single backends included);
  ``aiq_norm`` rescales it so that Q_weak = 0 and Q_strong = 1 (random mixing = 0.5 when
  the cheaper backend is the weaker one).
- gap recovered = (Q_policy - Q_best_single) / (Q_oracle - Q_best_single).
- cost to reach f of the oracle's gain: the least mean cost on the policy's curve (linear
  between sweep points, i.e. randomising at a threshold) with Q >= Q_cheap + f (Q_oracle - Q_cheap),
  where "cheap" is the single backend with the lower mean cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from classifiers.training.metrics import auc  # noqa: F401 - one AUC for the project (re-exported)

T, H = 0, 1
ORACLE_SCALE = 0.1  # quality units (nats/token) per unit of the oracle's log-odds


@dataclass(frozen=True)
class Curve:
    """A threshold sweep: arrays of equal length, ordered from all-hybrid to all-transformer."""

    thresholds: np.ndarray  # +inf first (nothing to the transformer)
    share_t: np.ndarray  # share of requests routed to the transformer
    quality: np.ndarray
    cost: np.ndarray


def oracle_choice(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """True where the transformer is the better backend (ties go to the cheaper one)."""
    return (q[:, T] > q[:, H]) | ((q[:, T] == q[:, H]) & (c[:, T] < c[:, H]))


def oracle_scores(q: np.ndarray, c: np.ndarray | None = None,
                  scale: float = ORACLE_SCALE) -> np.ndarray:
    """The oracle's scores (the one oracle: the registered ``oracle`` policy,
    :class:`evals.harness.oracle.OraclePolicy`, scores with this too): sigmoid of the
    measured quality gap (q_T - q_H) / scale, shape (n,).

    Monotone in the gap, so its sweep is the best ordering by gap; at threshold 0.5 it
    routes each request to its better backend. With costs ``c``, a tie goes to the cheaper
    backend (as in :func:`oracle_choice`); without, a tie scores 0.5 (the transformer)."""
    d = q[:, T] - q[:, H]
    s = 1.0 / (1.0 + np.exp(-np.clip(d / scale, -50, 50)))
    if c is not None:
        tie = d == 0
        s[tie] = np.where(c[tie, T] < c[tie, H], 0.5, 0.5 - 1e-9)
    return s


def point(route_t: np.ndarray, q: np.ndarray, c: np.ndarray) -> tuple[float, float]:
    """(mean quality, mean cost) of a boolean routing (True = transformer)."""
    idx = np.where(route_t, T, H)
    rows = np.arange(len(idx))
    return float(q[rows, idx].mean()), float(c[rows, idx].mean())


def sweep(scores: np.ndarray, q: np.ndarray, c: np.ndarray) -> Curve:
    """Every distinct threshold, in O(n log n): sort by score and take cumulative gains."""
    n = len(scores)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    dq = np.cumsum(q[order, T] - q[order, H])
    dc = np.cumsum(c[order, T] - c[order, H])
    # k routed = positions where the next score is strictly lower (end of a tie group)
    ends = np.flatnonzero(np.r_[s[1:] < s[:-1], True]) + 1 if n else np.array([], int)
    k = np.r_[0, ends]
    base_q, base_c = q[:, H].mean(), c[:, H].mean()
    gq = np.r_[0.0, dq[ends - 1]] if n else np.zeros(1)
    gc = np.r_[0.0, dc[ends - 1]] if n else np.zeros(1)
    thr = np.r_[np.inf, s[ends - 1]] if n else np.array([np.inf])
    return Curve(thr, k / max(n, 1), base_q + gq / max(n, 1), base_c + gc / max(n, 1))


def pareto_front(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (no other point is cheaper-or-equal and better),
    sorted by cost."""
    order = np.lexsort((-quality, cost))
    qs = quality[order]
    prev_best = np.r_[-np.inf, np.maximum.accumulate(qs)[:-1]]
    return order[qs > prev_best].astype(int)


def upper_hull(cost: np.ndarray, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing upper convex hull (RouterBench): vertices (cost, quality) sorted
    by cost; beyond its highest vertex the hull stays flat."""
    pts = sorted(set(zip(cost.tolist(), quality.tolist(), strict=True)))
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # not a right turn
                hull.pop()
            else:
                break
        if hull and hull[-1][0] == p[0]:
            hull[-1] = p if p[1] > hull[-1][1] else hull[-1]
        else:
            hull.append(p)
    hx = np.array([h[0] for h in hull])
    hy = np.maximum.accumulate(np.array([h[1] for h in hull]))
    return hx, hy


def aiq(curve: Curve, singles: tuple[tuple[float, float], tuple[float, float]]) -> float:
    """Mean of the non-decreasing hull over [c_lo, c_hi], the single backends' mean costs.
    ``singles`` = ((Q_T, C_T), (Q_H, C_H))."""
    (qt, ct), (qh, ch) = singles
    cost, quality = np.r_[curve.cost, ct, ch], np.r_[curve.quality, qt, qh]
    front = pareto_front(cost, quality)  # dominated points never raise the hull
    hx, hy = upper_hull(cost[front], quality[front])
    lo, hi = min(ct, ch), max(ct, ch)
    if hi - lo <= 0:
        return float(np.interp(lo, hx, hy))
    grid = np.unique(np.r_[lo, hi, hx[(hx > lo) & (hx < hi)]])
    vals = np.interp(grid, hx, hy)  # hy is flat beyond the last vertex (np.interp clamps)
    return float(np.trapezoid(vals, grid) / (hi - lo))


def apgr(curve: Curve, q_t: float, q_h: float) -> float:
    """RouteLLM's APGR on the transformer/hybrid pair (NaN when the singles tie)."""
    if q_t == q_h:
        return float("nan")
    strong_t = q_t > q_h
    q_weak, q_strong = (q_h, q_t) if strong_t else (q_t, q_h)
    x = curve.share_t if strong_t else 1.0 - curve.share_t
    pgr = (curve.quality - q_weak) / (q_strong - q_weak)
    order = np.argsort(x, kind="stable")
    return float(np.trapezoid(pgr[order], x[order]))


def cost_to_reach(curve: Curve, target: float) -> float:
    """Least mean cost on the piecewise-linear curve with quality >= target (NaN if none)."""
    q, c = curve.quality, curve.cost
    cands = [c[q >= target]]
    q0, q1, c0, c1 = q[:-1], q[1:], c[:-1], c[1:]
    cross = (q0 - target) * (q1 - target) < 0  # segments that cross the target
    if cross.any():
        a = (target - q0[cross]) / (q1[cross] - q0[cross])
        cands.append(c0[cross] + a * (c1[cross] - c0[cross]))
    allc = np.concatenate(cands)
    return float(allc.min()) if len(allc) else float("nan")


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b != 0 else float("nan")


def policy_metrics(scores: np.ndarray, route_t: np.ndarray, q: np.ndarray, c: np.ndarray,
                   fractions: tuple[float, ...] = (0.5, 0.8)) -> dict[str, float]:
    """Every scalar metric of one policy on one table (see the module docstring).

    ``route_t``: the policy's own decisions at its operating threshold (True = transformer).
    Costs to reach are given as ``cost_to_{f}`` (mean cost) and ``cost_to_{f}_rel`` (share
    of the extra cost from the cheaper single backend to the dearer one)."""
    qt, qh = float(q[:, T].mean()), float(q[:, H].mean())
    ct, ch = float(c[:, T].mean()), float(c[:, H].mean())
    oracle = oracle_choice(q, c)
    q_or, _ = point(oracle, q, c)
    q_best = max(qt, qh)
    q_pol, c_pol = point(route_t, q, c)
    curve = sweep(scores, q, c)
    cheap_q, cheap_c, dear_c = (qt, ct, ch) if ct < ch else (qh, ch, ct)
    out = {
        "quality": q_pol,
        "cost": c_pol,
        "share_transformer": float(route_t.mean()),
        "gap_recovered": _safe_div(q_pol - q_best, q_or - q_best),
        "accuracy": float((route_t == oracle).mean()),
        "auc": auc(oracle, scores),
        "apgr": apgr(curve, qt, qh),
        "aiq": aiq(curve, ((qt, ct), (qh, ch))),
    }
    out["aiq_norm"] = _safe_div(out["aiq"] - min(qt, qh), abs(qt - qh))
    for f in fractions:
        cost = cost_to_reach(curve, cheap_q + f * (q_or - cheap_q)) if q_or > cheap_q else float("nan")
        key = f"cost_to_{round(f * 100)}"
        out[key] = cost
        out[key + "_rel"] = _safe_div(cost - cheap_c, dear_c - cheap_c)
    return out


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a bootstrap percentile interval (NaN where undefined)."""

    value: float
    lo: float
    hi: float

    def to_list(self) -> list[float | None]:
        return [None if not np.isfinite(v) else float(v) for v in (self.value, self.lo, self.hi)]


def bootstrap(fn, n: int, reps: int = 1000, seed: int = 0, alpha: float = 0.05
              ) -> tuple[dict[str, Estimate], np.ndarray]:
    """Percentile bootstrap over requests: ``fn(idx) -> dict[str, float]`` on a resample.

    Returns ({metric: Estimate}, the resample index matrix (reps, n)) so callers can reuse
    the same resamples for every policy (paired comparisons)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(reps, n))
    point_est = fn(np.arange(n))
    samples: dict[str, list[float]] = {k: [] for k in point_est}
    for row in idx:
        for k, v in fn(row).items():
            samples[k].append(v)
    out = {}
    for k, v in point_est.items():
        arr = np.asarray(samples[k], dtype=float)
        arr = arr[np.isfinite(arr)]
        if not np.isfinite(v) or len(arr) < max(10, reps // 10):
            out[k] = Estimate(v, float("nan"), float("nan"))
        else:
            lo, hi = np.quantile(arr, [alpha / 2, 1 - alpha / 2])
            out[k] = Estimate(v, float(lo), float(hi))
    return out, idx
