"""The request classifier on real requests, and how well it transfers to unseen sources.

:class:`RealRouter` is what ships: hand-written features (:mod:`classifiers.features`) plus
the instruction's hashed n-gram logit (:mod:`classifiers.textrep`, stacked: its value on the
training rows is out-of-source, from group folds), a LightGBM class model calibrated by
Platt scaling on out-of-source scores (so P(transformer better) is calibrated for *new*
sources, not for the training mix), a LightGBM gap regressor, and the profiles'
thresholds, chosen on out-of-source predictions of the training data:

- ``quality``: the threshold that maximises mean quality (least nats/token);
- ``cost``: the best quality with at most :data:`COST_BUDGET` of requests on the transformer
  (the backend that keeps a KV cache: the memory-expensive one).

:func:`leave_one_source_out` is the headline evaluation: train on every source but one,
test on that one, for every source; per source and pooled, with bootstrap CIs. A source is
a request file (``group``). Rows of :data:`~classifiers.training.realdata.EVAL_ONLY` files are only
ever tested on (with a model trained on every other source).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np

from classifiers.features import FEATURE_NAMES, FEATURES
from classifiers.probe import PROBE_FEATURES
from classifiers.request import RoutingRequest
from classifiers.textrep import HashedTextModel
from classifiers.training.estimators import (
    LightGBMGapRegressor,
    LightGBMRouter,
    LogisticRouter,
    _platt,
    _sigmoid,
)
from classifiers.training.labels import MARGIN
from classifiers.training.realdata import EVAL_ONLY

log = logging.getLogger(__name__)

COST_BUDGET = 0.5  # the cost profile: at most this share of requests on the transformer
REGRET_TOL = 0.03  # the robust quality threshold: no source worse than its best backend by more
INNER_FOLDS = 4  # group folds for the stacked text logit, calibration and thresholds


def routing_request(row: dict) -> RoutingRequest:
    """The request a policy sees for a label row (real: the conversation; mix: the prompt)."""
    if "messages" in row:
        return RoutingRequest.from_messages(row["messages"])
    return RoutingRequest.from_prompt(row["prompt"])


def feature_matrix(reqs: Sequence[RoutingRequest], progress: bool = True) -> np.ndarray:
    """Every feature of every request, one row each (a progress bar with ``progress``)."""
    from classifiers.features import extract

    it: Sequence[RoutingRequest] = reqs
    if progress:
        from tqdm import tqdm

        it = tqdm(reqs, desc="features", unit="req")
    return np.stack([extract(q) for q in it])


def _take(reqs: Sequence[RoutingRequest], mask: np.ndarray) -> list[RoutingRequest]:
    """The requests where the boolean ``mask`` is set, in order."""
    return [reqs[int(i)] for i in np.flatnonzero(mask)]


class _LGBParams(TypedDict):
    """The LightGBM hyperparameters :class:`RealRouter` passes to both of its models."""

    random_state: int
    n_estimators: int
    num_leaves: int
    min_child_samples: int
    colsample_bytree: float


def _platt_slope(scores: np.ndarray, y: np.ndarray) -> float:
    """a with P(y=1) = sigmoid(a * score), fitted by logistic regression without intercept."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e4, fit_intercept=False, max_iter=1000)
    return float(lr.fit(scores.reshape(-1, 1), y).coef_[0, 0])


def group_folds(groups: np.ndarray, k: int) -> list[np.ndarray]:
    """Test masks of ``k`` folds with whole groups, balanced by size (largest first)."""
    names, counts = np.unique(groups, return_counts=True)
    k = min(k, len(names))
    load = np.zeros(k)
    assign: dict[str, int] = {}
    for i in np.argsort(-counts):
        f = int(np.argmin(load))
        assign[names[i]] = f
        load[f] += counts[i]
    fold = np.array([assign[g] for g in groups])
    return [fold == f for f in range(k)]


def quality_threshold(p: np.ndarray, lt: np.ndarray, lh: np.ndarray,
                      max_transformer: float | None = None) -> float:
    """The threshold t (transformer when p >= t) with the least mean loss on these rows,
    optionally with at most ``max_transformer`` of them routed to the transformer. Ties go
    to the middle of the best interval."""
    order = np.argsort(-p)
    ps = p[order]
    # routing the top-j scores to the transformer, j = 0..n
    loss = lh.sum() + np.concatenate(([0.0], np.cumsum((lt - lh)[order])))
    j = np.arange(len(p) + 1)
    # only cut between distinct scores
    ok = np.ones(len(p) + 1, bool)
    ok[1:-1] = ps[:-1] > ps[1:]
    if max_transformer is not None:
        ok &= j <= max_transformer * len(p)
    best = int(j[ok][np.argmin(loss[ok])])
    if best == 0:
        return float(min(1.01, ps[0] + 1e-9)) if len(ps) else 0.5
    if best == len(p):
        return 0.0
    return float((ps[best - 1] + ps[best]) / 2)


def robust_threshold(p: np.ndarray, lt: np.ndarray, lh: np.ndarray, sources: np.ndarray,
                     tol: float = REGRET_TOL, grid: int = 201) -> float:
    """The threshold with the least mean loss among those that leave no source worse than
    its own best single backend by more than ``tol`` nats/token (on out-of-source scores,
    that is the leave-one-source-out condition); if none does, the one whose worst source
    is least bad."""
    ts = np.unique(np.concatenate((np.quantile(p, np.linspace(0, 1, grid)), [0.5, 1.01])))
    names = np.unique(sources)
    masks = [sources == s for s in names]
    best = [min(lt[m].mean(), lh[m].mean()) for m in masks]
    mean, worst = np.empty(len(ts)), np.empty(len(ts))
    for i, t in enumerate(ts):
        lr = np.where(p >= t, lt, lh)
        mean[i] = lr.mean()
        worst[i] = max(lr[m].mean() - b for m, b in zip(masks, best, strict=True))
    ok = worst <= tol
    if ok.any():
        return float(ts[ok][np.argmin(mean[ok])])
    return float(ts[np.argmin(worst)])


@dataclass
class RealRouter:
    """The shipped model (see the module docstring). ``fit`` takes the feature matrix, the
    requests (for the text model), the gaps, both losses and the source of each row."""

    seed: int = 0
    use_text: bool = True
    kind: str = "lightgbm"  # "logistic" (the scikit-learn baseline, same inputs) or
    #                          "regressor" (score = minus the expected gap: magnitudes count)
    feature_mask: np.ndarray | None = None  # columns of X to use (None: all)
    n_estimators: int = 300
    num_leaves: int = 15
    min_child_samples: int = 20
    colsample_bytree: float = 0.8
    weight_by_gap: bool = False  # weight rows by |gap| (what a wrong decision costs)
    objective: str = "huber"  # the regressor kind's loss: "huber" or "regression" (L2, the mean)
    clip_gap: float = 3.0  # regressor targets clipped to +-clip_gap nats/token
    # the quality threshold: "oof" (least loss on out-of-fold predictions), "robust" (least
    # loss with no source's out-of-source regret above REGRET_TOL) or, for the regressor
    # kind, "expected_gap" (the transformer when the expected gap is below 0)
    quality_rule: str = "oof"
    text_: HashedTextModel | None = None
    clf_: LightGBMRouter | None = None
    reg_: LightGBMGapRegressor | None = None
    calibration_: tuple[float, float] = (1.0, 0.0)
    thresholds_: dict[str, float] = field(default_factory=dict)
    oof_: np.ndarray | None = None

    def _cols(self, X: np.ndarray) -> np.ndarray:
        return X if self.feature_mask is None else X[:, self.feature_mask]

    def _stack(self, X: np.ndarray, text: np.ndarray | None) -> np.ndarray:
        X = self._cols(X)
        return np.column_stack((X, text)) if text is not None else X

    def _text_oof(self, reqs: Sequence[RoutingRequest], y: np.ndarray, decisive: np.ndarray,
                  folds: list[np.ndarray]) -> np.ndarray:
        out = np.zeros(len(reqs))
        for te in folds:
            tr = ~te & decisive
            if len(np.unique(y[tr])) < 2:
                continue
            m = HashedTextModel().fit(_take(reqs, tr), y[tr])
            out[te] = m.logits(_take(reqs, te))
        return out

    def fit(self, X: np.ndarray, reqs: Sequence[RoutingRequest], gap: np.ndarray,
            lt: np.ndarray, lh: np.ndarray, groups: np.ndarray,
            margin: float = MARGIN) -> RealRouter:
        """``groups`` are the inner folds' units: pass source/kind (whole kinds of a source
        held out together), so the stacked text logit, the calibration and the thresholds
        see predictions for kinds of requests the model was not fitted on."""
        if self.quality_rule == "expected_gap" and self.kind != "regressor":
            raise ValueError("quality_rule='expected_gap' needs kind='regressor'")
        decisive = np.abs(gap) > margin
        y = (gap < 0).astype(int)
        folds = group_folds(groups, INNER_FOLDS)
        text = None
        if self.use_text:
            text = self._text_oof(reqs, y, decisive, folds)
            self.text_ = HashedTextModel().fit(_take(reqs, decisive), y[decisive])
        Z = self._stack(X, text)
        # a leaf needs at most 1/20 of the decisive rows, so small data can still split
        min_leaf = min(self.min_child_samples, max(5, int(decisive.sum()) // 20))
        kw: _LGBParams = {"random_state": self.seed, "n_estimators": self.n_estimators,
              "num_leaves": self.num_leaves, "min_child_samples": min_leaf,
              "colsample_bytree": self.colsample_bytree}
        w = np.clip(np.abs(gap), 0.05, 2.0) if self.weight_by_gap else np.ones(len(Z))
        # out-of-source raw scores: calibration and thresholds hold for unseen sources
        raw = np.zeros(len(Z))
        for te in folds:
            tr = ~te & decisive
            if len(np.unique(y[tr])) < 2:
                continue
            if self.kind == "regressor":
                tr = ~te
            raw[te] = self._raw(self._fit(kw, Z[tr], y[tr], w[tr], gap[tr]), Z[te])
        if self.quality_rule in ("expected_gap", "robust") and self.kind == "regressor":
            # P(transformer better) = sigmoid(a * -E[gap]): no intercept, so P = 0.5 exactly
            # where the expected gap is 0, and every fold's scores share one zero point
            a, b = _platt_slope(raw[decisive], y[decisive]), 0.0
        else:
            a, b = _platt(raw[decisive], y[decisive])
        if a <= 0:  # out-of-source scores rank backwards: keep the model's own scale
            log.warning("out-of-source Platt slope %.3f <= 0; using the raw scores", a)
            a, b = 1.0, 0.0
        self.calibration_ = (a, b)
        self.oof_ = _sigmoid(a * raw + b)
        if self.quality_rule == "expected_gap":
            q = 0.5
        elif self.quality_rule == "robust":
            q = robust_threshold(self.oof_, lt, lh, np.array([u.split("/")[0] for u in groups]))
        else:
            q = quality_threshold(self.oof_, lt, lh)
        self.thresholds_ = {
            "quality": q,
            "cost": quality_threshold(self.oof_, lt, lh, max_transformer=COST_BUDGET),
        }
        fit_rows = np.ones(len(Z), bool) if self.kind == "regressor" else decisive
        self.clf_ = self._fit(kw, Z[fit_rows], y[fit_rows], w[fit_rows], gap[fit_rows])
        self.reg_ = LightGBMGapRegressor(**kw).fit(Z, gap) if self.kind == "lightgbm" else None
        return self

    def _fit(self, kw: _LGBParams, Z: np.ndarray, y: np.ndarray, w: np.ndarray, gap: np.ndarray):
        if self.kind == "logistic":
            return LogisticRouter().fit(Z, y)
        if self.kind == "regressor":  # the score is the expected gap, negated
            return LightGBMGapRegressor(objective=self.objective, **kw).fit(
                Z, np.clip(gap, -self.clip_gap, self.clip_gap))
        return LightGBMRouter(cv=0, **kw).fit(Z, y, sample_weight=w)

    @staticmethod
    def _raw(model, Z: np.ndarray) -> np.ndarray:
        if isinstance(model, LightGBMRouter):
            return model.booster_.predict(Z, raw_score=True, num_threads=1)
        if isinstance(model, LightGBMGapRegressor):
            return -model.predict(Z)
        p = np.clip(model.predict_proba(Z)[:, 1], 1e-9, 1 - 1e-9)
        return np.log(p / (1 - p))

    def text_logits(self, reqs: Sequence[RoutingRequest]) -> np.ndarray | None:
        return self.text_.logits(reqs) if self.use_text and self.text_ is not None else None

    def predict_proba(self, X: np.ndarray, reqs: Sequence[RoutingRequest]) -> np.ndarray:
        """Calibrated P(transformer better), shape (n,)."""
        assert self.clf_ is not None
        Z = self._stack(X, self.text_logits(reqs))
        a, b = self.calibration_
        return _sigmoid(a * self._raw(self.clf_, Z) + b)

    def predict_gap(self, X: np.ndarray, reqs: Sequence[RoutingRequest]) -> np.ndarray:
        assert self.reg_ is not None
        return self.reg_.predict(self._stack(X, self.text_logits(reqs)))


# ---- evaluation ---------------------------------------------------------------------------

def policy_losses(route_t: np.ndarray, lt: np.ndarray, lh: np.ndarray) -> np.ndarray:
    """Per-request loss (nats/token) of a routing (True = transformer)."""
    return np.where(route_t, lt, lh)


def routing_summary(p: np.ndarray, t: float, gap: np.ndarray, lt: np.ndarray, lh: np.ndarray,
                    margin: float = MARGIN, n_boot: int = 1000, seed: int = 0,
                    route: np.ndarray | None = None) -> dict:
    """Everything the transfer tables report for one set of held-out rows: AUC and accuracy
    (decisive rows), mean losses of the router, always-transformer, always-hybrid, random
    (expected, 50/50) and the oracle, regret against the best single backend, and the share
    of the oracle's gain over that backend the router recovers; 95% bootstrap CIs."""
    from classifiers.training.metrics import auc as roc_auc

    n = len(p)
    route = p >= t if route is None else np.asarray(route, bool)
    lr, lo = policy_losses(route, lt, lh), np.minimum(lt, lh)
    mean = {"router": lr.mean(), "always_transformer": lt.mean(), "always_hybrid": lh.mean(),
            "random": ((lt + lh) / 2).mean(), "oracle": lo.mean()}
    best_is_t = lt.mean() <= lh.mean()
    lb = lt if best_is_t else lh
    keep = np.abs(gap) > margin
    y = (gap < 0).astype(int)

    def stats(idx: np.ndarray) -> tuple[float, float, float]:
        k = idx[keep[idx]]
        yk = y[k]
        auc = roc_auc(yk, p[k])
        # the best single backend of the full set (fixed), as in the point estimate
        head = lb[idx].mean() - lo[idx].mean()
        rec = (lb[idx].mean() - lr[idx].mean()) / head if head > 1e-12 else float("nan")
        return auc, rec, lr[idx].mean() - lb[idx].mean()

    auc, rec, reg = stats(np.arange(n))
    rng = np.random.default_rng(seed)
    boots = np.array([stats(rng.integers(0, n, n)) for _ in range(n_boot)]) if n else np.zeros((0, 3))

    def ci(j: int) -> list[float]:
        v = boots[:, j][np.isfinite(boots[:, j])] if len(boots) else np.zeros(0)
        return [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))] if len(v) else [np.nan] * 2

    return {"n": int(n), "n_decisive": int(keep.sum()), "threshold": float(t),
            "transformer_wins": float((gap < -margin).mean()) if n else float("nan"),
            "auc": auc, "auc_ci": ci(0),
            "accuracy": float((route[keep] == (y[keep] == 1)).mean()) if keep.any() else float("nan"),
            "routed_transformer": float(route.mean()) if n else float("nan"),
            "loss": {k: float(v) for k, v in mean.items()},
            "best_single": "transformer" if best_is_t else "hybrid",
            "regret_vs_best": reg, "regret_vs_best_ci": ci(2),
            "recovered": rec, "recovered_ci": ci(1)}


def label_arrays(rows: Sequence[dict]) -> tuple[np.ndarray, ...]:
    """(gap, loss_transformer, loss_hybrid, source, source/kind) of label rows, as arrays."""
    return (np.array([r["gap"] for r in rows]), np.array([r["loss_transformer"] for r in rows]),
            np.array([r["loss_hybrid"] for r in rows]), np.array([r["group"] for r in rows]),
            np.array([f"{r['group']}/{r.get('kind')}" for r in rows]))


def leave_one_source_out(X: np.ndarray, reqs: Sequence[RoutingRequest], rows: Sequence[dict],
                         make_model=RealRouter, progress: bool = True,
                         profiles: Sequence[str] = ("quality", "cost"),
                         train_only: Sequence[str] = ()) -> dict:
    """Train on every source but one, test on it. Returns, per profile, per-source summaries
    and the pooled summary (all held-out predictions of the trainable sources together, each
    routed at its own fold's threshold), plus the held-out predictions and thresholds.
    Evaluation-only sources are predicted by a model trained on every trainable source;
    ``train_only`` sources (e.g. the synthetic mix) are in every training set and never
    tested on."""
    gap, lt, lh, groups, units = label_arrays(rows)
    trainable = ~np.isin(groups, list(EVAL_ONLY))
    extra = np.isin(groups, list(train_only))
    p = np.full(len(rows), np.nan)
    thr = {k: np.full(len(rows), np.nan) for k in profiles}
    names = sorted(set(groups[trainable & ~extra]))
    folds = [(g, groups == g, trainable & (groups != g)) for g in names]
    if (~trainable).any():
        folds.append(("(eval only)", ~trainable, trainable))
    it = folds
    if progress:
        from tqdm import tqdm

        it = tqdm(folds, desc="leave-one-source-out", unit="source")
    for _, test, tr in it:
        m = make_model().fit(X[tr], _take(reqs, tr), gap[tr], lt[tr], lh[tr],
                             units[tr])
        p[test] = m.predict_proba(X[test], _take(reqs, test))
        for k in profiles:
            thr[k][test] = m.thresholds_[k]
    out: dict = {"p": p.tolist(), "threshold": {k: v.tolist() for k, v in thr.items()}}
    trainable &= ~extra  # pooled and per-source figures: real held-out sources only
    for k in profiles:
        per = {}
        for g in sorted(set(groups[~extra])):
            s = groups == g
            per[g] = routing_summary(p[s], float(np.median(thr[k][s])), gap[s], lt[s], lh[s])
            per[g]["eval_only"] = bool(g in EVAL_ONLY)
        s = trainable
        out[k] = {"per_source": per,
                  "pooled": routing_summary(p[s], float("nan"), gap[s], lt[s], lh[s],
                                            route=p[s] >= thr[k][s])}
    return out


# ---- the `archroute train` path for real labels -------------------------------------------

# The instruction-level features that say what the answer will be (the ``task`` group but
# ``assistant_share``): leave-one-source-out they transfer to unseen sources better than the
# whole feature set, whose length and density features mostly tell the sources' formats apart.
TASK_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES
                                       if f.group == "task" and f.name != "assistant_share")
_REG = {"num_leaves": 7, "min_child_samples": 100, "n_estimators": 200}
VARIANTS: dict[str, dict] = {
    "gap regressor task+text, robust threshold (shipped)": {
        "kind": "regressor", "objective": "regression", "quality_rule": "robust",
        "use_text": True, "features": TASK_FEATURES, **_REG},
    "gap regressor task+text, expected-gap threshold": {
        "kind": "regressor", "objective": "regression", "quality_rule": "expected_gap",
        "use_text": True, "features": TASK_FEATURES, **_REG},
    "gap regressor task": {"kind": "regressor", "objective": "regression",
                           "quality_rule": "robust", "use_text": False,
                           "features": TASK_FEATURES, **_REG},
    "lightgbm classifier task": {"kind": "lightgbm", "use_text": False, "weight_by_gap": True,
                                 "features": TASK_FEATURES, **_REG},
    "lightgbm classifier task+text": {"kind": "lightgbm", "use_text": True,
                                      "weight_by_gap": True, "features": TASK_FEATURES, **_REG},
    "lightgbm classifier, all features+text": {"kind": "lightgbm", "use_text": True,
                                               "weight_by_gap": True, "features": FEATURE_NAMES,
                                               **_REG},
    "logistic task+text": {"kind": "logistic", "use_text": True, "features": TASK_FEATURES},
}
SHIPPED = "gap regressor task+text, robust threshold (shipped)"


def make_router(name: str, seed: int = 0, probe: bool = False) -> RealRouter:
    """A fresh model of a named variant; with ``probe``, over :func:`probe_columns`' matrix
    (the request features, then the prompt probe's) reading the probe's columns too."""
    cfg = dict(VARIANTS[name])
    feats = list(cfg.pop("features"))
    names: tuple[str, ...] = FEATURE_NAMES
    if probe:
        feats += PROBE_FEATURES
        names = (*FEATURE_NAMES, *PROBE_FEATURES)
    return RealRouter(seed=seed, feature_mask=np.isin(names, feats), **cfg)


PROBE_HINT = ("relabel with `archroute label` (it records the probe, both models' losses on "
              "the prompt, on in-process pairs that share a tokenizer)")


def probe_matrix(rows: Sequence[dict]) -> np.ndarray:
    """The prompt probe's columns (:data:`PROBE_FEATURES`, in order) of label rows, NaN where
    a category is absent. A row without ``probe`` is a ``ValueError`` that says how to get
    it (:data:`PROBE_HINT`)."""
    missing = [r.get("id", "?") for r in rows if not isinstance(r.get("probe"), dict)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(rows)} label rows carry no prompt probe "
                         f"(e.g. {missing[0]}): {PROBE_HINT}")
    return np.array([[np.nan if (v := r["probe"].get(k)) is None else float(v)
                      for k in PROBE_FEATURES] for r in rows], dtype=np.float64)



def reliability(p: np.ndarray, gap: np.ndarray, margin: float = MARGIN, bins: int = 10) -> list[dict]:
    """Predicted P(transformer better) against the observed rate, per probability bin
    (decisive rows)."""
    keep = np.abs(gap) > margin
    p, y = p[keep], (gap[keep] < 0).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if m.any():
            out.append({"bin": [float(lo), float(hi)], "n": int(m.sum()),
                        "predicted": float(p[m].mean()), "observed": float(y[m].mean())})
    return out


def plot_reliability(table: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=120)
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfectly calibrated")
    x = [r["predicted"] for r in table]
    y = [r["observed"] for r in table]
    size = [max(8, 600 * r["n"] / max(1, sum(t["n"] for t in table))) for r in table]
    ax.plot(x, y, color="#1f6feb", lw=1.5)
    ax.scatter(x, y, s=size, color="#1f6feb", zorder=3, label="bins (area = requests)")
    ax.set_xlabel("predicted P(transformer better)")
    ax.set_ylabel("observed share where the transformer was better")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fmt_ci(v: float, ci: Sequence[float], fmt: str = ".3f") -> str:
    if v is None or v != v:
        return "–"
    return f"{v:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def transfer_table(res: dict) -> str:
    """Markdown: one row per held-out source, then the pooled row."""
    lines = ["| held-out source | n | transformer wins | AUC [95% CI] | accuracy | to transformer | "
             "always-T | always-H | random | router | oracle | regret vs best single | "
             "oracle gap recovered [95% CI] |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    items = [*res["per_source"].items(), ("**pooled (trainable sources)**", res["pooled"])]
    for g, s in items:
        name = f"{g} (eval only)" if s.get("eval_only") else g
        loss = s["loss"]
        lines.append(
            f"| {name} | {s['n']} | {s['transformer_wins']:.0%} | {fmt_ci(s['auc'], s['auc_ci'])} | "
            f"{s['accuracy']:.3f} | {s['routed_transformer']:.0%} | {loss['always_transformer']:.3f} | "
            f"{loss['always_hybrid']:.3f} | {loss['random']:.3f} | {loss['router']:.3f} | "
            f"{loss['oracle']:.3f} | {s['regret_vs_best']:+.3f} | "
            f"{fmt_ci(s['recovered'], s['recovered_ci'], '.2f')} |")
    return "\n".join(lines)


def _finite(obj):
    """NaN and infinities as null, numpy scalars as Python numbers: strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


MIX_GROUP = "synthetic-mix"


def train_real(rows: list[dict], out_dir, results_path, request_paths: Sequence[str],
               variants: Sequence[str] = tuple(VARIANTS), seed: int = 0, plots_dir=None,
               progress: bool = True, extra_rows: Sequence[dict] = ()) -> dict:
    """Leave-one-source-out for each variant, the random split, the final fit on every
    trainable source, the artifact, the results (JSON + Markdown) and the reliability plot.
    ``extra_rows`` (labels of the synthetic mix) join every training set as one more source,
    :data:`MIX_GROUP`, and are never tested on."""
    import json
    import time
    from pathlib import Path

    from classifiers.training.labels import labels_hash, summarize
    from classifiers.training.realdata import file_provenance
    from models.provenance import git_commit

    extra = [{**r, "group": MIX_GROUP} for r in extra_rows]
    rows = sorted([*rows, *extra], key=lambda r: (r["group"], r["id"]))  # the cache's order is its history
    reqs = [routing_request(r) for r in rows]
    X = feature_matrix(reqs, progress)
    gap, lt, lh, groups, units = label_arrays(rows)
    trainable = ~np.isin(groups, list(EVAL_ONLY))
    real = groups != MIX_GROUP
    results: dict = {"label_summary": summarize([r for r in rows if r["group"] != MIX_GROUP]),
                     "n_rows": int(real.sum()), "train_only_sources": [MIX_GROUP] if extra else [],
                     "ref_cut": int(sum(bool(r.get("ref_cut")) for r in rows)),
                     "sources": {g: summarize([r for r in rows if r["group"] == g])
                                 for g in sorted(set(groups))},
                     "leave_one_source_out": {}, "random_split": {}}
    for name in variants:
        t0 = time.perf_counter()
        res = leave_one_source_out(X, reqs, rows, make_model=lambda n=name: make_router(n, seed),
                                   progress=progress, train_only=[MIX_GROUP] if extra else [])
        res["seconds"] = time.perf_counter() - t0
        if name != SHIPPED:
            res.pop("p"), res.pop("threshold")
        results["leave_one_source_out"][name] = res
        po = res["quality"]["pooled"]
        print(f"{name}: pooled AUC {fmt_ci(po['auc'], po['auc_ci'])}, oracle gap recovered "
              f"{fmt_ci(po['recovered'], po['recovered_ci'], '.2f')} ({res['seconds']:.0f} s)")
    # the secondary, in-distribution number: a random 80/20 split of the trainable rows
    from classifiers.training.realdata import RealRequest

    split = np.array([RealRequest(r["id"], "", "", "", (), "").split for r in rows])
    tr, te = trainable & ((split == "train") | ~real), trainable & real & (split == "test")
    m = make_router(SHIPPED, seed).fit(X[tr], _take(reqs, tr), gap[tr], lt[tr],
                                  lh[tr], units[tr])
    pt = m.predict_proba(X[te], _take(reqs, te))
    results["random_split"] = routing_summary(pt, m.thresholds_["quality"], gap[te], lt[te], lh[te])
    # the shipped model: every trainable source
    final = make_router(SHIPPED, seed).fit(X[trainable], _take(reqs, trainable),
                                      gap[trainable], lt[trainable], lh[trainable], units[trainable])
    shipped = results["leave_one_source_out"][SHIPPED]
    p_loso = np.array(shipped["p"])
    shipped.pop("p"), shipped.pop("threshold")
    rel = reliability(p_loso[trainable & real], gap[trainable & real])
    results["reliability"] = rel
    # thresholds with a guarantee (classifiers/training/risk.py), on the final model's out-of-source
    # predictions of its own training rows
    from classifiers.training.risk import RISK_ALPHAS, RISK_DELTA, rate_threshold

    assert final.oof_ is not None
    for a in RISK_ALPHAS:
        final.thresholds_[f"risk-{a:g}"] = rate_threshold(
            final.oof_, lt[trainable], lh[trainable], a, RISK_DELTA)
    results["thresholds"] = final.thresholds_
    results["cost_budget"] = COST_BUDGET
    provenance = file_provenance(request_paths)
    used = set(groups)
    meta = {"margin": MARGIN, "center": 0.0, "git_commit": git_commit(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "thresholds": final.thresholds_, "cost_budget_transformer_share": COST_BUDGET,
            "training_data": {"kind": "real requests", "sha256": labels_hash(rows),
                              "pair": rows[0].get("pair"), "n_train": int(trainable.sum()),
                              "train_only_sources": results["train_only_sources"],
                              "files": [f for f in provenance if f["file"].removesuffix(".jsonl") in used]},
            "metrics": {"leave_one_source_out_pooled": shipped["quality"]["pooled"],
                        "leave_one_source_out_pooled_cost_profile": shipped["cost"]["pooled"],
                        "random_split": results["random_split"]},
            "label_summary": results["label_summary"]}
    save_shipped(final, out_dir, meta)
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(_finite(results), indent=1) + "\n")
    md = [f"## Leave-one-source-out: {SHIPPED}, quality profile", "",
          transfer_table(shipped["quality"]), "",
          f"## Leave-one-source-out: {SHIPPED}, cost profile (at most {COST_BUDGET:.0%} of "
          "requests to the transformer)", "", transfer_table(shipped["cost"]), ""]
    md += ["## Variants (pooled, leave-one-source-out)", "",
           "| model | AUC [95% CI] | oracle gap recovered [95% CI] | regret vs best single | fit s |",
           "| --- | --- | --- | ---: | ---: |"]
    for name, res in results["leave_one_source_out"].items():
        po = res["quality"]["pooled"]
        md.append(f"| {name} | {fmt_ci(po['auc'], po['auc_ci'])} | "
                  f"{fmt_ci(po['recovered'], po['recovered_ci'], '.2f')} | {po['regret_vs_best']:+.3f} | "
                  f"{res['seconds']:.0f} |")
    rs = results["random_split"]
    md += ["", f"Random 80/20 split (in-distribution, secondary): AUC {fmt_ci(rs['auc'], rs['auc_ci'])}, "
           f"recovered {fmt_ci(rs['recovered'], rs['recovered_ci'], '.2f')}, n = {rs['n']}.", ""]
    results_path.with_suffix(".md").write_text("\n".join(md))
    if plots_dir is not None:
        Path(plots_dir).mkdir(parents=True, exist_ok=True)
        plot_reliability(rel, Path(plots_dir) / "reliability.png",
                         "P(transformer better), leave-one-source-out, trainable sources")
    print("\n".join(md))
    return results


def save_shipped(final: RealRouter, out_dir, meta: dict, probe: bool = False) -> None:
    """Write a fitted model of the shipped variant as the artifact (the regressor kind's
    booster predicts the gap; its score is the negative, hence the calibration's sign);
    with ``probe`` its feature names end with :data:`PROBE_FEATURES` (:func:`make_router`)."""
    from classifiers import artifact

    assert final.clf_ is not None
    cal, reg = final.calibration_, final.reg_
    if final.kind == "regressor":
        cal, reg = (-cal[0], cal[1]), final.clf_
    names = [n for n in FEATURE_NAMES if n in VARIANTS[SHIPPED]["features"]]
    artifact.save(out_dir, final.clf_, reg, _finite(meta), text=final.text_, calibration=cal,
                  feature_names=[*names, *PROBE_FEATURES] if probe else names)


def fit_quick(rows: Sequence[dict], reqs: Sequence[RoutingRequest], out_dir, seed: int = 0,
              training_data: dict | None = None, probe: bool = False) -> dict:
    """The quick path (``archroute train --quick`` / ``--from-log``): the shipped variant
    fitted once on every trainable row, no leave-one-source-out sweep, then saved and loaded
    back with its self-check (a strict load, as a live reload does). Its thresholds (quality,
    cost, risk) are chosen on the model's own out-of-fold predictions, by group folds of
    ``source/kind`` as in :func:`train_real`; those predictions are also what the returned
    summary (AUC, share of the oracle's gain recovered) is computed on: held out from each
    fold's model, but from the same sources, so an in-distribution figure.

    ``probe`` (``archroute train --probe``): the prompt probe's features (each row's
    ``probe``, :func:`probe_matrix`; a row without it is a ``ValueError`` naming
    ``archroute label``) join the request features; the artifact names them, and the
    router's ``probe`` policy measures them per request."""
    import time

    from classifiers import artifact
    from classifiers.training.labels import labels_hash, summarize
    from classifiers.training.risk import RISK_ALPHAS, RISK_DELTA, rate_threshold
    from models.provenance import git_commit

    keep = [i for i, r in enumerate(rows) if r["group"] not in EVAL_ONLY]
    rows = [rows[i] for i in keep]
    reqs = [reqs[i] for i in keep]
    X = feature_matrix(reqs, progress=False)
    if probe:
        X = np.column_stack((X, probe_matrix(rows)))
    gap, lt, lh, groups, units = label_arrays(rows)
    decisive = np.abs(gap) > MARGIN
    n_t, n_h = int((decisive & (gap < 0)).sum()), int((decisive & (gap > 0)).sum())
    if min(n_t, n_h) < 10 or len(set(units)) < 2:
        raise ValueError(f"too few labels to train on: {n_t} transformer-better and {n_h} "
                         f"hybrid-better requests beyond ±{MARGIN} nats/token (at least 10 of "
                         "each are needed)")
    t0 = time.perf_counter()
    final = make_router(SHIPPED, seed, probe).fit(X, list(reqs), gap, lt, lh, units)
    assert final.oof_ is not None
    for a in RISK_ALPHAS:
        final.thresholds_[f"risk-{a:g}"] = rate_threshold(final.oof_, lt, lh, a, RISK_DELTA)
    oof = routing_summary(final.oof_, final.thresholds_["quality"], gap, lt, lh, n_boot=200,
                          seed=seed)
    meta = {"margin": MARGIN, "center": 0.0, "git_commit": git_commit(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "thresholds": final.thresholds_, "cost_budget_transformer_share": COST_BUDGET,
            "training_data": {"kind": "quick fit", "sha256": labels_hash(list(rows)),
                              "n_train": len(rows),
                              "sources": dict(zip(*np.unique(groups, return_counts=True),
                                                  strict=True)),
                              **(training_data or {})},
            "metrics": {"out_of_fold": oof},
            "label_summary": summarize(list(rows))}
    save_shipped(final, out_dir, meta, probe)
    clf = artifact.load(out_dir, verify=True, strict=True)  # the self-check, as a reload runs it
    return {"n_train": len(rows), "n_transformer_better": n_t, "n_hybrid_better": n_h,
            "thresholds": final.thresholds_, "out_of_fold": oof, "sha256": clf.sha256,
            "fit_s": time.perf_counter() - t0}
