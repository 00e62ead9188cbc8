"""Off-policy evaluation from the router's own decision log: ``archroute eval --from-log DB``.

Each routed request the log holds with its propensity (the probability with which the router
chose the backend it chose, ``router/serving.py``) and a reward is one row of
:func:`evals.ope.estimate`. The reward is either the client's feedback (``POST
/v1/feedback``: a number in [-1, 1], thumbs = +1 / -1) or, for a request with a scored
reference, minus the loss of the backend the router chose (nats/token). The target policy's
action is recomputed from the logged request (so the log must hold prompts:
``log_prompts``), and IPS, SNIPS and DR are printed with bootstrap CIs and the effective
sample size. DR's direct model comes from the classifier's gap regressor: a common level
plus a per-backend split of the predicted gap, its two coefficients fitted by least
squares on the logged rewards.

Rows left out, and counted: requests not routed by a scoring profile (a backend named
directly, span profiles, chat apps' side requests), failures, rows logged before
propensities were, fallbacks (the reward belongs to the backend that served, not to the
logged choice), rows without a reward and rows without a prompt.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from classifiers.request import RoutingRequest
from router.learning.logrows import routing_request

log = logging.getLogger(__name__)

REWARDS = ("auto", "feedback", "loss")


class LogEvalError(ValueError):
    """The log cannot answer the question (no prompts, no rewards, nothing eligible)."""


def action_reward(row: dict, kind: str) -> float | None:
    """The row's reward: its feedback, or minus the chosen backend's loss (a label)."""
    if kind == "feedback":
        return None if row.get("reward") is None else float(row["reward"])
    if row.get("label_status") != "done":
        return None
    loss = row["loss_transformer"] if row["decision"] == "transformer" else row["loss_hybrid"]
    return None if loss is None or not math.isfinite(loss) else -float(loss)


@dataclass
class LoggedData:
    rows: list[dict]
    requests: list[RoutingRequest]
    action: np.ndarray  # 1 = transformer
    logged_choice: np.ndarray  # what the logging policy picked before exploration
    propensity: np.ndarray
    reward: np.ndarray
    reward_kind: str
    left_out: Counter
    n_rows: int


def eligible(rows: Sequence[dict], profile: str | None = None,
             reward: str = "auto") -> LoggedData:
    """The rows an off-policy estimate can use, and why the others are left out."""
    if reward not in REWARDS:
        raise LogEvalError(f"reward must be one of {REWARDS}, got {reward!r}")
    left: Counter = Counter()
    routed = []
    for r in rows:
        if profile is not None and r.get("profile") != profile:
            left["other profile"] += 1
        elif r.get("status") != 200 or r.get("backend") is None:
            left["not served (error)"] += 1
        elif r.get("side") or r.get("policy") in (None, "side-request") \
                or r.get("decision") not in ("transformer", "hybrid"):
            left["not routed by a policy (backend named, span, side request)"] += 1
        elif r.get("propensity") is None:
            left["no propensity (logged before propensities)"] += 1
        elif r.get("fallback_from"):
            left["fallback (the reward is the other backend's)"] += 1
        else:
            routed.append(r)
    if reward == "auto":
        reward = "feedback" if any(r.get("reward") is not None for r in routed) else "loss"
    keep, reqs = [], []
    no_prompt = 0
    for r in routed:
        if action_reward(r, reward) is None:
            left[f"no {'feedback' if reward == 'feedback' else 'scored reference'}"] += 1
            continue
        q = routing_request(r)
        if q is None:
            no_prompt += 1
            continue
        keep.append(r)
        reqs.append(q)
    if no_prompt:
        left["no prompt (log_prompts was off)"] += no_prompt
    if not keep:
        if no_prompt:
            raise LogEvalError(
                f"the log holds no prompts for the {no_prompt} rows with a reward: the target "
                "policy's choice is recomputed from each request's text, so start the router "
                "with log_prompts: true (--log-prompts) and collect feedback again")
        counts = ", ".join(f"{k}: {v}" for k, v in left.items()) or "the log is empty"
        raise LogEvalError(f"no row to evaluate on ({counts})")
    action = np.array([int(r["decision"] == "transformer") for r in keep])
    explored = np.array([bool(r.get("explored")) for r in keep])
    return LoggedData(keep, reqs, action, np.where(explored, 1 - action, action),
                      np.array([float(r["propensity"]) for r in keep]),
                      np.array([action_reward(r, reward) for r in keep], dtype=float),
                      reward, left, len(rows))


def direct_model(reqs: Sequence[RoutingRequest], action: np.ndarray, reward: np.ndarray,
                 clf) -> tuple[np.ndarray, np.ndarray, dict]:
    """(q_t, q_h, fit): the reward each backend is expected to get, from the classifier's
    gap regressor (expected loss_t - loss_h): ``q = c -/+ k * gap / 2``, with ``c`` and ``k``
    fitted by least squares on the logged rows (for rewards = -loss, k is about 1)."""
    g = np.asarray(clf.gap_from_features(clf.features(list(reqs))), float)
    x = np.where(action == 1, -g / 2, g / 2)
    A = np.column_stack((np.ones(len(x)), x))
    (c, k), *_ = np.linalg.lstsq(A, reward, rcond=None)
    return c - k * g / 2, c + k * g / 2, {"c": float(c), "k": float(k)}


def evaluate(rows: Sequence[dict], policy: str = "classifier", threshold: float | None = None,
             profile: str | None = None, reward: str = "auto", artifact: str | None = None,
             n_boot: int = 1000, seed: int = 0) -> dict:
    """Estimates of the target policy (and, for reference, always-transformer,
    always-hybrid and the logging router's own choice without exploration)."""
    from classifiers import artifact as A
    from evals.ope import estimate
    from router.policies import get_policy

    data = eligible(rows, profile, reward)
    kwargs = {"artifact": artifact} if artifact and policy == "classifier" else {}
    pol = get_policy(policy, **kwargs)
    thr = pol.default_threshold() if threshold is None else threshold
    scores = np.array(pol.score_batch(data.requests))
    targets = {f"{policy} (threshold {thr:.3f})": (scores >= thr).astype(int),
               "always-transformer": np.ones(len(scores), int),
               "always-hybrid": np.zeros(len(scores), int),
               "logging router, without exploration": data.logged_choice}
    q_t = q_h = None
    dm: dict = {}
    try:
        clf = A.load(artifact) if artifact else A.load_default()
        q_t, q_h, dm = direct_model(data.requests, data.action, data.reward, clf)
    except (A.ArtifactError, OSError) as exc:
        dm = {"unavailable": str(exc)}
    labelled = data.reward_kind == "loss" and all(
        r.get("loss_transformer") is not None and r.get("loss_hybrid") is not None
        for r in data.rows)
    out: dict = {"n_rows": data.n_rows, "n_used": len(data.rows), "reward": data.reward_kind,
                 "left_out": dict(data.left_out), "policy": policy, "threshold": float(thr),
                 "explored": int(sum(bool(r.get("explored")) for r in data.rows)),
                 "propensity_min": float(data.propensity.min()),
                 "logged_mean_reward": float(data.reward.mean()), "direct_model": dm,
                 "targets": {}}
    for name, target in targets.items():
        est = estimate(data.action, data.propensity, data.reward, target, q_t, q_h,
                       n_boot=n_boot, seed=seed)
        t = {k: {"value": e.value, "ci": list(e.ci), "ess": e.ess} for k, e in est.items()}
        res: dict = {"share_transformer": float(target.mean()), "estimates": t}
        if labelled:  # both losses known: the exact value on these rows
            lt = np.array([r["loss_transformer"] for r in data.rows])
            lh = np.array([r["loss_hybrid"] for r in data.rows])
            res["labelled_value"] = float(-np.where(target == 1, lt, lh).mean())
        out["targets"][name] = res
    return out


def report(res: dict) -> str:
    """The estimates as a Markdown table, with what was left out and why."""
    unit = "nats/token (reward = -loss)" if res["reward"] == "loss" else "feedback reward"
    lines = [f"{res['n_used']} of {res['n_rows']} logged requests used; reward: {unit}; "
             f"{res['explored']} explored; smallest propensity {res['propensity_min']:.3f}; "
             f"mean logged reward {res['logged_mean_reward']:+.4f}"]
    for why, n in sorted(res["left_out"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  left out: {n} {why}")
    dm = res["direct_model"]
    lines.append("DR direct model: " + (f"gap regressor, reward = {dm['c']:+.4f} -/+ "
                                        f"{dm['k']:.3f} x predicted gap / 2" if "c" in dm
                                        else f"unavailable ({dm.get('unavailable')}): no DR"))
    if res["explored"] == 0:
        lines.append("no request in these rows was explored (epsilon 0): a policy is only seen "
                     "where it agrees with the logging router; serve with epsilon > 0")
    labelled = any("labelled_value" in t for t in res["targets"].values())
    head = "| target policy | to transformer | IPS [95% CI] | SNIPS [95% CI] | DR [95% CI] | ESS |"
    sep = "| --- | ---: | --- | --- | --- | ---: |"
    if labelled:
        head += " labelled value |"
        sep += " ---: |"
    lines += ["", head, sep]

    def f(e: dict | None) -> str:
        if e is None or e["value"] != e["value"]:
            return "–"
        return f"{e['value']:+.4f} [{e['ci'][0]:+.4f}, {e['ci'][1]:+.4f}]"

    for name, t in res["targets"].items():
        e = t["estimates"]
        row = (f"| {name} | {t['share_transformer']:.0%} | {f(e.get('ips'))} | "
               f"{f(e.get('snips'))} | {f(e.get('dr'))} | {e['ips']['ess']:.0f} |")
        if labelled:
            row += f" {t.get('labelled_value', float('nan')):+.4f} |"
        lines.append(row)
    if labelled:
        lines.append("\nlabelled value: every row here has both backends' losses measured "
                     "(a scored reference), so each policy's exact mean on these rows is known: "
                     "the estimates can be checked against it")
    return "\n".join(lines)


def run(db: str, policy: str = "classifier", threshold: float | None = None,
        profile: str | None = None, reward: str = "auto", artifact: str | None = None,
        n_boot: int = 1000, seed: int = 0, json_out: str | None = None) -> int:
    """``archroute eval --from-log``: print the report; 2 when the log cannot answer."""
    import json
    import sys
    from pathlib import Path

    from router.decision_log import read_log, redact_url

    try:
        rows = read_log(db)
    except Exception as exc:  # noqa: BLE001 - a missing file, a database that refuses
        print(f"archroute eval --from-log: cannot read {redact_url(str(db))}: {exc}",
              file=sys.stderr)
        return 2
    try:
        res = evaluate(rows, policy, threshold, profile, reward, artifact, n_boot, seed)
    except (LogEvalError, ValueError) as exc:
        print(f"archroute eval --from-log: {exc}", file=sys.stderr)
        return 2
    res["log"] = redact_url(str(db))
    print(report(res))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(res, indent=1) + "\n")
    return 0
