"""Safe updates: a candidate policy goes live only when the log says it is better (#24, item 1).

The evidence is the decision log's **held-back** requests: a fixed quarter of request ids
(:func:`held_back`, a hash, so a request is held back forever or never) that no candidate
is ever trained or guarded on. On them, each policy's value is estimated doubly robustly
(:func:`dr_terms`, the estimator of :mod:`evals.ope`): ``q(x, target) + 1[a = target] /
propensity * (reward - q(x, a))``, reward = minus the served backend's loss (nats/token).
For a request with a scored reference both backends' losses are measured, so its direct
model ``q`` is the measurement and its term is exact; elsewhere ``q`` comes from a model.

The candidate passes when the mean of the per-request **difference** (candidate minus
serving, the same rows: paired) has a 95% bootstrap CI (:func:`scipy.stats.bootstrap`,
percentile, over requests) entirely above zero. Too few held-back rows, or no row where
the two policies route differently, is a refusal too: no evidence, no change.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

HOLDOUT_PARTS = 4  # one part in this many is held back for the gate
MIN_HELD_BACK = 20
LEVEL = 0.95
N_BOOT = 2000


def held_back(request_id: str, parts: int = HOLDOUT_PARTS) -> bool:
    """True for the requests the gate judges on and nothing is fitted on."""
    h = hashlib.sha256(f"holdout:{request_id}".encode()).hexdigest()
    return int(h, 16) % parts == 0


def dr_terms(action: np.ndarray, propensity: np.ndarray, reward: np.ndarray,
             target: np.ndarray, q_t: np.ndarray, q_h: np.ndarray) -> np.ndarray:
    """Per-row doubly robust terms of ``target``'s value (their mean is the estimate).
    ``action``/``target``: 1 = transformer; ``q_t``/``q_h``: the direct model's reward for
    each backend (the measured ones where both are known)."""
    action, target = np.asarray(action, int), np.asarray(target, int)
    q_t, q_h = np.asarray(q_t, float), np.asarray(q_h, float)
    w = (action == target) / np.asarray(propensity, float)
    q_target = np.where(target == 1, q_t, q_h)
    q_logged = np.where(action == 1, q_t, q_h)
    return q_target + w * (np.asarray(reward, float) - q_logged)


def mean_ci(x: np.ndarray, level: float = LEVEL, n_boot: int = N_BOOT,
            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``x`` (scipy.stats.bootstrap); a constant
    ``x`` gives (value, value)."""
    from scipy import stats

    x = np.asarray(x, float)
    if len(x) == 0:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = stats.bootstrap((x,), np.mean, n_resamples=n_boot, confidence_level=level,
                          method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class GateResult:
    """The gate's verdict and its evidence (rewards: minus nats/token, higher is better)."""

    passed: bool
    reason: str
    n: int  # held-back rows used
    n_disagree: int  # of them, where the two policies route differently
    serving: float  # DR estimate of the serving policy
    candidate: float  # DR estimate of the candidate
    difference: float  # candidate - serving
    ci: tuple[float, float]  # LEVEL bootstrap CI of the difference
    level: float = LEVEL

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = [None if not math.isfinite(v) else v for v in self.ci]
        for k in ("serving", "candidate", "difference"):
            if not math.isfinite(d[k]):
                d[k] = None
        return d


def compare(serving: np.ndarray, candidate: np.ndarray, action: np.ndarray,
            propensity: np.ndarray, reward: np.ndarray, q_t: np.ndarray, q_h: np.ndarray,
            level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0,
            min_rows: int = MIN_HELD_BACK) -> GateResult:
    """The gate on held-back rows: does ``candidate`` (actions, 1 = transformer) beat
    ``serving``, with the CI of the paired DR difference above zero?"""
    serving, candidate = np.asarray(serving, int), np.asarray(candidate, int)
    n = len(serving)
    disagree = int((serving != candidate).sum())
    if n < min_rows:
        return GateResult(False, f"too few held-back labelled requests: {n} (at least "
                          f"{min_rows} are needed)", n, disagree, math.nan, math.nan, math.nan,
                          (math.nan, math.nan), level)
    ds = dr_terms(action, propensity, reward, serving, q_t, q_h)
    dc = dr_terms(action, propensity, reward, candidate, q_t, q_h)
    diff = dc - ds
    lo, hi = mean_ci(diff, level, n_boot, seed)
    v_s, v_c, d = float(ds.mean()), float(dc.mean()), float(diff.mean())
    if disagree == 0:
        return GateResult(False, f"the candidate routes all {n} held-back requests as the "
                          "serving policy does: nothing to gain", n, 0, v_s, v_c, d, (lo, hi),
                          level)
    if lo > 0:
        why = (f"the candidate beats the serving policy by {d:+.4f} nats/token on {n} held-back "
               f"requests ({level:.0%} CI [{lo:+.4f}, {hi:+.4f}])")
        return GateResult(True, why, n, disagree, v_s, v_c, d, (lo, hi), level)
    why = (f"not better with confidence: candidate - serving = {d:+.4f} nats/token on {n} "
           f"held-back requests, {level:.0%} CI [{lo:+.4f}, {hi:+.4f}] (its lower end must be "
           "above 0)")
    return GateResult(False, why, n, disagree, v_s, v_c, d, (lo, hi), level)


def log_rows(rows: Sequence[dict], held: bool = True) -> list[dict]:
    """Decision-log rows the gate (``held=True``) or training (``held=False``) may use:
    served by a policy's decision (no fallback, no side request), with a propensity, a
    scored reference (both losses) and the request (``log_prompts``)."""
    out = []
    for r in rows:
        if (r.get("status") != 200 or r.get("side") or r.get("fallback_from")
                or r.get("decision") not in ("transformer", "hybrid")
                or r.get("propensity") is None or r.get("label_status") != "done"):
            continue
        lt, lh = r.get("loss_transformer"), r.get("loss_hybrid")
        if lt is None or lh is None or not (math.isfinite(lt) and math.isfinite(lh)):
            continue
        if r.get("request") is None and r.get("prompt") is None:
            continue
        if held_back(str(r["request_id"])) == held:
            out.append(r)
    return out


def arrays(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """(action, propensity, reward, q_t, q_h) of labelled log rows: the reward is minus the
    chosen backend's loss and the direct model is the measured losses."""
    lt = np.array([float(r["loss_transformer"]) for r in rows])
    lh = np.array([float(r["loss_hybrid"]) for r in rows])
    action = np.array([int(r["decision"] == "transformer") for r in rows])
    return {"action": action, "propensity": np.array([float(r["propensity"]) for r in rows]),
            "reward": -np.where(action == 1, lt, lh), "q_t": -lt, "q_h": -lh}


def log_trained(meta: dict) -> bool:
    """Whether an artifact was trained on a decision log (then a reload is gated)."""
    td = meta.get("training_data") or {}
    return bool(td.get("decision_log")) or bool(td.get("n_from_log"))


def judge(rows: Sequence[dict], serving, serving_threshold: float, candidate,
          candidate_threshold: float, seed: int = 0) -> GateResult:
    """The gate on a decision log's held-back labelled rows for two scoring policies
    (anything with ``score_batch``; the transformer when score >= threshold)."""
    from router.learning.logrows import routing_request

    held = log_rows(rows, held=True)
    reqs = [routing_request(r) for r in held]
    keep = [i for i, q in enumerate(reqs) if q is not None]
    held, reqs = [held[i] for i in keep], [reqs[i] for i in keep]
    if not held:
        return compare(np.zeros(0, int), np.zeros(0, int), np.zeros(0), np.ones(0),
                       np.zeros(0), np.zeros(0), np.zeros(0), seed=seed)
    s = (np.asarray(serving.score_batch(reqs)) >= serving_threshold).astype(int)
    c = (np.asarray(candidate.score_batch(reqs)) >= candidate_threshold).astype(int)
    a = arrays(held)
    return compare(s, c, a["action"], a["propensity"], a["reward"], a["q_t"], a["q_h"],
                   seed=seed)
