"""Off-policy evaluation of routing policies from logged decisions (issue #16, item 3).

A log row is one served request: the backend chosen (``action``: 1 = transformer,
0 = hybrid), the probability with which the logging router chose it (``propensity``), the
observed ``reward`` (e.g. minus the loss in nats/token, or a user's thumbs mapped to a
number), and what a direct model predicts for each action (``q_t``, ``q_h``). A target
policy is given as the action it would take on each row (``target``: 1/0).

Estimators of the target policy's mean reward:

- **IPS** (inverse propensity scoring): mean of ``1[a = target] / propensity * reward``.
  Unbiased when every action the target takes has propensity > 0 in the log (overlap);
  its variance grows with 1 / propensity.
- **SNIPS** (self-normalised IPS): the same weights, divided by their sum instead of n.
  Slightly biased, usually much lower variance.
- **DR** (doubly robust): ``q(x, target) + 1[a = target] / propensity * (reward -
  q(x, a))``. Unbiased if the propensities are right, whatever the direct model; lower
  variance the better the direct model is.

A deterministic router logs propensity 1 for its choice and 0 for the other: a target that
ever disagrees with it has no overlap there and IPS/DR cannot see its value. Exploration
(``epsilon``: that share of requests goes to the other backend at random, propensity logged)
makes every action observable. ``effective_sample_size`` = (sum w)^2 / sum w^2 says how many
rows the estimate is worth.

:func:`simulate` builds logs from labelled requests (both backends' losses known, so each
policy's true value is known) to check the estimators: ``python -m evals.ope``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Estimate:
    name: str
    value: float
    ci: tuple[float, float]
    ess: float


def _terms(action: np.ndarray, propensity: np.ndarray, reward: np.ndarray, target: np.ndarray,
           q_t: np.ndarray | None, q_h: np.ndarray | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-row (numerator, denominator) terms of each estimator; the estimate is
    sum(num) / sum(den)."""
    match = (action == target).astype(float)
    w = match / propensity
    ones = np.ones(len(action))
    out = {"ips": (w * reward, ones), "snips": (w * reward, w)}
    if q_t is not None and q_h is not None:
        q_target = np.where(target == 1, q_t, q_h)
        q_logged = np.where(action == 1, q_t, q_h)
        out["dr"] = (q_target + w * (reward - q_logged), ones)
    return out


def estimate(action, propensity, reward, target, q_t=None, q_h=None, n_boot: int = 1000,
             seed: int = 0, level: float = 0.95) -> dict[str, Estimate]:
    """IPS, SNIPS and (with a direct model) DR estimates of ``target``'s mean reward, each
    with a percentile bootstrap CI over rows and the effective sample size of its weights.
    Raises ValueError on propensities outside (0, 1]."""
    action, target = np.asarray(action, int), np.asarray(target, int)
    propensity, reward = np.asarray(propensity, float), np.asarray(reward, float)
    if len(action) == 0:
        raise ValueError("empty log")
    if np.any(propensity <= 0) or np.any(propensity > 1):
        raise ValueError("propensities must be in (0, 1]")
    terms = _terms(action, propensity, reward, target,
                   None if q_t is None else np.asarray(q_t, float),
                   None if q_h is None else np.asarray(q_h, float))
    w = (action == target) / propensity
    ess = float(w.sum() ** 2 / (w ** 2).sum()) if (w ** 2).sum() > 0 else 0.0
    rng = np.random.default_rng(seed)
    n = len(action)
    idx = rng.integers(0, n, (n_boot, n)) if n_boot else None
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for name, (num, den) in terms.items():
        value = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
        if idx is not None:
            bn, bd = num[idx].sum(1), den[idx].sum(1)
            boots = np.where(bd > 0, bn / np.where(bd > 0, bd, 1), np.nan)
            boots = boots[np.isfinite(boots)]
            ci = (float(np.quantile(boots, lo_q)), float(np.quantile(boots, hi_q))) \
                if len(boots) else (float("nan"), float("nan"))
        else:
            ci = (float("nan"), float("nan"))
        out[name] = Estimate(name, value, ci, ess)
    return out


def logging_propensities(choice: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(P(transformer), P(hybrid)) per row for a router that picks ``choice`` (1 = transformer)
    and sends ``epsilon`` of requests to the other backend at random."""
    choice = np.asarray(choice, int)
    p_t = np.where(choice == 1, 1 - epsilon, epsilon)
    return p_t, 1 - p_t


def simulate(lt: np.ndarray, lh: np.ndarray, logging_choice: np.ndarray, epsilon: float,
             seed: int, reward_noise: float = 0.0) -> dict[str, np.ndarray]:
    """One simulated log: actions drawn from the logging router with exploration, rewards =
    minus the served backend's loss (plus Gaussian noise of sd ``reward_noise``, e.g. for
    noisy user feedback)."""
    rng = np.random.default_rng(seed)
    p_t, _ = logging_propensities(logging_choice, epsilon)
    action = (rng.random(len(lt)) < p_t).astype(int)
    propensity = np.where(action == 1, p_t, 1 - p_t)
    reward = -np.where(action == 1, lt, lh) + rng.normal(0, reward_noise, len(lt)) \
        if reward_noise else -np.where(action == 1, lt, lh)
    return {"action": action, "propensity": propensity, "reward": reward}


def coverage(lt: np.ndarray, lh: np.ndarray, logging_choice: np.ndarray,
             targets: dict[str, np.ndarray], q_t: np.ndarray, q_h: np.ndarray,
             epsilon: float = 0.1, reps: int = 100, n_boot: int = 300,
             reward_noise: float = 0.0) -> dict[str, dict[str, dict[str, float]]]:
    """For each target policy and estimator: the share of repetitions whose 95% CI holds the
    true value, the mean estimate, the truth, the mean absolute error and the mean ESS."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, target in targets.items():
        truth = float(-np.where(target == 1, lt, lh).mean())
        acc: dict[str, list[tuple[float, bool, float]]] = {}
        for r in range(reps):
            log = simulate(lt, lh, logging_choice, epsilon, seed=r, reward_noise=reward_noise)
            est = estimate(log["action"], log["propensity"], log["reward"], target, q_t, q_h,
                           n_boot=n_boot, seed=r)
            for k, e in est.items():
                acc.setdefault(k, []).append((e.value, e.ci[0] <= truth <= e.ci[1], e.ess))
        out[name] = {k: {"truth": truth, "mean_estimate": float(np.mean([v for v, _, _ in xs])),
                         "coverage": float(np.mean([c for _, c, _ in xs])),
                         "mae": float(np.mean([abs(v - truth) for v, _, _ in xs])),
                         "ess": float(np.mean([e for _, _, e in xs]))}
                     for k, xs in acc.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m evals.ope``: estimator checks on simulated logs built from the real-request
    labels (docs/evals.md, "Off-policy evaluation"). The logging router is the shipped
    classifier at its quality threshold with ``--epsilon`` exploration; the targets are
    always-transformer, always-hybrid, the classifier at other thresholds and random."""
    import argparse

    from classifiers.artifact import load_default
    from classifiers.training.labels import require_labels
    from classifiers.training.train_router import routing_request

    ap = argparse.ArgumentParser(prog="python -m evals.ope", description=main.__doc__)
    ap.add_argument("--labels", default="data/labels/real.jsonl")
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--n", type=int, default=3000, help="requests sampled from the labels")
    ap.add_argument("--reward-noise", type=float, default=0.5,
                    help="sd of Gaussian noise on each reward (nats/token)")
    a = ap.parse_args(argv)
    rows = [r for r in require_labels(a.labels, latest_only=True) if r["gap"] == r["gap"]]
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in sorted(rng.choice(len(rows), min(a.n, len(rows)), replace=False))]
    clf = load_default()
    reqs = [routing_request(r) for r in rows]
    X = clf.features(reqs)
    p = clf.p_transformer_from_features(X)
    g = clf.gap_from_features(X)  # expected loss_t - loss_h
    lt = np.array([r["loss_transformer"] for r in rows])
    lh = np.array([r["loss_hybrid"] for r in rows])
    m = (lt + lh).mean() / 2  # the direct model: a common level, split by the predicted gap
    q_t, q_h = -(m + g / 2), -(m - g / 2)
    thr = clf.thresholds
    logging_choice = (p >= thr["quality"]).astype(int)
    targets = {"always-transformer": np.ones(len(rows), int),
               "always-hybrid": np.zeros(len(rows), int),
               "classifier (quality)": logging_choice,
               "classifier (risk-0.1)": (p >= thr.get("risk-0.1", 0.65)).astype(int),
               "classifier (cost)": (p >= thr["cost"]).astype(int),
               "random": rng.integers(0, 2, len(rows))}
    res = coverage(lt, lh, logging_choice, targets, q_t, q_h, a.epsilon, a.reps,
                   reward_noise=a.reward_noise)
    print(f"{len(rows)} labelled requests, logging policy: classifier at its quality threshold, "
          f"epsilon {a.epsilon}, reward = -loss + N(0, {a.reward_noise}), {a.reps} simulated logs, "
          "95% bootstrap CIs (300 resamples)\n")
    print("| target policy | true value | estimator | mean estimate | mean abs error | "
          "CI coverage | ESS |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, by in res.items():
        for k, v in by.items():
            print(f"| {name} | {v['truth']:.4f} | {k.upper()} | {v['mean_estimate']:.4f} | "
                  f"{v['mae']:.4f} | {v['coverage']:.0%} | {v['ess']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
