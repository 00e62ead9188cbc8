"""Never below the best single backend: a guard around any gap predictor (issue #24, item 2).

Fitted on labelled requests (both backends' losses known: ``archroute label`` rows, or the
decision log's requests with a scored reference), the guard knows, with a confidence bound:

- the **best single backend** of all of them (the ``global`` default: lower mean loss);
- **clusters** of them: k-means (scikit-learn) on the standardised task features of the
  request (:func:`classifiers.features.extract_task`, what it asks: fix, extract, math,
  code payload, ...), about one cluster per :data:`ROWS_PER_CLUSTER` rows, at most
  :data:`MAX_CLUSTERS`. The request's ``kind``/source is not used: a router sees only the
  text. Each cluster's default is its own best single backend when the one-sided
  :data:`LEVEL` t-interval of its mean gap excludes zero, else the global default.
- per cluster, **when to route away** from its default: only for requests whose predicted
  gain (the gap predictor's ``loss_default - loss_other``) is at least a threshold ``tau``
  chosen so that, on held-out predictions of the labelled rows, the requests at or above
  it gained on average with a one-sided :data:`LEVEL` lower confidence bound above zero
  (Bonferroni over the thresholds tried). No such threshold: the cluster never leaves its
  default. Clusters with fewer than :data:`MIN_CLUSTER` rows use the global rule.
- what is **unlike** them: a request farther from every centroid than that cluster's
  radius (the 99th percentile of its members' distances, times 1.25) goes to the global
  default, whatever the predictor says.

Intervals come from :mod:`scipy.stats` (Student t). The guard is a small JSON file
(``guard.json`` beside a classifier artifact: :func:`save`, :func:`load`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from classifiers.request import RoutingRequest

GUARD_FILE = "guard.json"
LEVEL = 0.95  # one-sided confidence of every bound the guard uses
ROWS_PER_CLUSTER = 60
MAX_CLUSTERS = 8
MIN_CLUSTER = 20  # a cluster with fewer labelled rows follows the global rule
MIN_SWITCH = 8  # routing away needs at least this many labelled rows above the threshold
MIN_ROWS = 20  # fewer labelled rows: no guard can be fitted
RADIUS_QUANTILE, RADIUS_SLACK = 0.99, 1.25
T, H = 1, 0  # actions: 1 = transformer, 0 = hybrid


def cluster_features(reqs: Sequence[RoutingRequest]) -> np.ndarray:
    """The features clusters are made of: the task group, shape (n, len(TASK_NAMES))."""
    from classifiers.features import extract_task

    return np.stack([extract_task(q) for q in reqs]).astype(float)


def mean_bound(x: np.ndarray, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, one-sided lower bound, one-sided upper bound) of ``x``'s mean at ``level``
    (Student t; a single value or no spread gives the mean for both bounds)."""
    from scipy import stats

    x = np.asarray(x, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, -math.inf, math.inf
    se = float(x.std(ddof=1)) / math.sqrt(len(x))
    if se == 0:
        return m, m, m
    q = float(stats.t.ppf(level, len(x) - 1))
    return m, m - q * se, m + q * se


@dataclass
class Rule:
    """One cluster's (or the global) routing rule. ``default``: 1 transformer, 0 hybrid.
    ``tau``: route away from the default when the predicted gain (nats/token) is at least
    this (None: never)."""

    n: int
    mean_gap: float  # mean loss_transformer - loss_hybrid of its rows (nats/token)
    gap_bounds: tuple[float, float]  # one-sided LEVEL bounds of that mean
    default: int
    tau: float | None = None
    switch_gain: float | None = None  # mean realized gain of the rows at/above tau
    switch_lcb: float | None = None  # its lower bound (> 0 when tau is set)
    switch_share: float = 0.0  # share of the rows at/above tau
    centroid: list[float] | None = None
    radius: float | None = None


def _best_single(gap: np.ndarray, fallback: int | None, level: float) -> tuple[int, float, tuple]:
    m, lo, hi = mean_bound(gap, level)
    if fallback is None:  # the global rule: the lower mean loss
        return (T if m <= 0 else H), m, (lo, hi)
    if hi < 0:  # the transformer better, with confidence
        return T, m, (lo, hi)
    if lo > 0:
        return H, m, (lo, hi)
    return fallback, m, (lo, hi)


def _switch(gap: np.ndarray, pred_gap: np.ndarray, default: int,
            level: float) -> tuple[float | None, float | None, float | None, float]:
    """(tau, mean gain, its lower bound, share) of the best guarded switch, or Nones."""
    gain = gap if default == T else -gap  # realized gain of routing away from the default
    pg = pred_gap if default == T else -pred_gap
    cands = sorted({float(np.quantile(pg, q)) for q in np.linspace(0.0, 0.95, 20)})
    cands = [t for t in cands if t > 0 and (pg >= t).sum() >= MIN_SWITCH]
    if not cands:
        return None, None, None, 0.0
    alpha = (1 - level) / len(cands)  # Bonferroni over the thresholds tried
    best: tuple[float, float, float, float] | None = None
    for t in cands:
        sel = gain[pg >= t]
        m, lo, _ = mean_bound(sel, 1 - alpha)
        if lo > 0 and (best is None or lo * len(sel) > best[2] * best[3] * len(gain)):
            best = (t, m, lo, len(sel) / len(gain))
    if best is None:
        return None, None, None, 0.0
    return best


@dataclass
class Guard:
    """See the module docstring. ``fit`` takes cluster features (:func:`cluster_features`),
    held-out predicted gaps and both losses of each labelled row."""

    level: float = LEVEL
    seed: int = 0
    global_: Rule | None = None
    clusters: list[Rule] = field(default_factory=list)
    mean_: list[float] | None = None
    scale_: list[float] | None = None

    def fit(self, F: np.ndarray, pred_gap: np.ndarray, lt: np.ndarray,
            lh: np.ndarray) -> Guard:
        from sklearn.cluster import KMeans

        F, pred_gap = np.asarray(F, float), np.asarray(pred_gap, float)
        gap = np.asarray(lt, float) - np.asarray(lh, float)
        n = len(gap)
        if n < MIN_ROWS:
            raise ValueError(f"the guard needs at least {MIN_ROWS} labelled requests, got {n}")
        d, m, b = _best_single(gap, None, self.level)
        g = Rule(n, m, b, d)
        g.tau, g.switch_gain, g.switch_lcb, g.switch_share = _switch(gap, pred_gap, d,
                                                                     self.level)
        self.global_ = g
        mu, sd = F.mean(0), F.std(0)
        sd = np.where(sd > 1e-9, sd, 1.0)
        self.mean_, self.scale_ = mu.tolist(), sd.tolist()
        Z = (F - mu) / sd
        k = int(min(MAX_CLUSTERS, max(1, n // ROWS_PER_CLUSTER), len(np.unique(Z, axis=0))))
        km = KMeans(n_clusters=k, n_init=4, random_state=self.seed).fit(Z)
        dist = np.linalg.norm(Z - km.cluster_centers_[km.labels_], axis=1)
        self.clusters = []
        for c in range(k):
            s = km.labels_ == c
            radius = float(np.quantile(dist[s], RADIUS_QUANTILE)) * RADIUS_SLACK + 1e-6
            if s.sum() < MIN_CLUSTER:  # too few: the global rule, but still "known" traffic
                r = Rule(int(s.sum()), float(gap[s].mean()), (-math.inf, math.inf), g.default,
                         g.tau, centroid=km.cluster_centers_[c].tolist(), radius=radius)
            else:
                cd, cm, cb = _best_single(gap[s], g.default, self.level)
                r = Rule(int(s.sum()), cm, cb, cd, centroid=km.cluster_centers_[c].tolist(),
                         radius=radius)
                r.tau, r.switch_gain, r.switch_lcb, r.switch_share = _switch(
                    gap[s], pred_gap[s], cd, self.level)
            self.clusters.append(r)
        return self

    def assign(self, F: np.ndarray) -> np.ndarray:
        """Each row's cluster index, or -1 when it is farther than every cluster's radius."""
        assert self.mean_ is not None and self.scale_ is not None, "fit or load the guard first"
        Z = (np.asarray(F, float) - np.array(self.mean_)) / np.array(self.scale_)
        C = np.array([c.centroid for c in self.clusters])
        D = np.linalg.norm(Z[:, None, :] - C[None, :, :], axis=2)
        near = D.argmin(1)
        radius = np.array([c.radius for c in self.clusters])
        return np.where(D[np.arange(len(Z)), near] <= radius[near], near, -1)

    def actions(self, F: np.ndarray, pred_gap: np.ndarray) -> np.ndarray:
        """The guarded decision per row (1 = transformer, 0 = hybrid)."""
        assert self.global_ is not None
        pred_gap = np.asarray(pred_gap, float)
        cl = self.assign(F)
        out = np.empty(len(pred_gap), int)
        for i, c in enumerate(cl):
            if c < 0:  # unlike anything labelled: the best single backend measured
                out[i] = self.global_.default
                continue
            r = self.clusters[c]
            gain = pred_gap[i] if r.default == T else -pred_gap[i]
            out[i] = r.default if r.tau is None or gain < r.tau else 1 - r.default
        return out

    def summary(self) -> dict:
        """What the guard decided, for logs and the learning history."""
        assert self.global_ is not None
        name = {T: "transformer", H: "hybrid"}
        return {"n": self.global_.n, "best_single": name[self.global_.default],
                "mean_gap": self.global_.mean_gap, "gap_bounds": list(self.global_.gap_bounds),
                "clusters": [{"n": c.n, "default": name[c.default], "mean_gap": c.mean_gap,
                              "tau": c.tau, "switch_lcb": c.switch_lcb,
                              "switch_share": c.switch_share} for c in self.clusters]}

    def to_json(self) -> dict:
        return {"format": 1, "level": self.level, "seed": self.seed,
                "global": _finite(asdict(self.global_)) if self.global_ else None,
                "clusters": [_finite(asdict(c)) for c in self.clusters],
                "mean": self.mean_, "scale": self.scale_}

    @classmethod
    def from_json(cls, d: dict) -> Guard:
        """Raises ValueError on anything but a guard this module wrote."""
        try:
            if d.get("format") != 1:
                raise ValueError(f"unknown guard format {d.get('format')!r}")
            g = cls(level=float(d["level"]), seed=int(d["seed"]))
            g.global_ = _rule(d["global"])
            g.clusters = [_rule(c) for c in d["clusters"]]
            g.mean_, g.scale_ = [float(v) for v in d["mean"]], [float(v) for v in d["scale"]]
            width = len(g.mean_)
            if not g.clusters or len(g.scale_) != width or any(
                    c.centroid is None or len(c.centroid) != width or c.radius is None
                    for c in g.clusters):
                raise ValueError("clusters do not match the feature width")
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a guard: {type(exc).__name__}: {exc}") from None
        return g


def _finite(d: dict) -> dict:
    """Infinite bounds as None: strict JSON."""
    def f(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, tuple | list):
            return [f(x) for x in v]
        return v
    return {k: f(v) for k, v in d.items()}


def _rule(d: dict) -> Rule:
    b = d["gap_bounds"]
    bounds = (-math.inf if b[0] is None else float(b[0]), math.inf if b[1] is None else float(b[1]))
    return Rule(int(d["n"]), float(d["mean_gap"]), bounds, 1 if int(d["default"]) else 0,
                None if d.get("tau") is None else float(d["tau"]), d.get("switch_gain"),
                d.get("switch_lcb"), float(d.get("switch_share") or 0.0),
                None if d.get("centroid") is None else [float(v) for v in d["centroid"]],
                None if d.get("radius") is None else float(d["radius"]))


def save(guard: Guard, folder: str | Path) -> Path:
    path = Path(folder) / GUARD_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(guard.to_json(), indent=1) + "\n")
    tmp.replace(path)
    return path


def load(folder: str | Path) -> Guard | None:
    """The guard saved beside an artifact (None when there is none); ValueError when the
    file is not a guard."""
    path = Path(folder) / GUARD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{GUARD_FILE}: not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{GUARD_FILE}: not a JSON object")
    return Guard.from_json(data)
