"""The learning loop in one object: labels in, guarded candidates out, gated, rolled back.

:class:`LearningLoop` holds the live policy (an artifact, its guard and threshold) and the
labelled requests seen so far (each with the action the router took and its propensity).
:meth:`LearningLoop.step` is one retrain:

1. **rollback**: on the held-back requests that arrived since the last promotion, if the
   live policy is worse than the one it replaced (95% CI of the paired DR difference
   entirely below zero), the previous one serves again;
2. **candidate**: :func:`router.learning.candidate.fit_candidate` on the requests that are
   not held back (warm start from the base artifact, guard on held-out predictions);
3. **gate**: :func:`router.learning.gate.compare` on every held-back request; the candidate
   goes live only when it passes. A candidate that fails to fit or load never replaces the
   live policy.

Every step is an event in :attr:`LearningLoop.history` (and counted in
:attr:`LearningLoop.counters`). ``archroute eval --simulate-shift`` (evals/shift.py) drives
this class with simulated traffic.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from classifiers.request import RoutingRequest
from router.learning import gate as Gt
from router.learning import guard as G

log = logging.getLogger(__name__)


@dataclass
class Served:
    """A policy the loop can serve: an artifact, its guard (None: the artifact's threshold
    decides) and the threshold."""

    name: str
    clf: object  # classifiers.artifact.RequestClassifier
    guard: G.Guard | None
    threshold: float

    @classmethod
    def of(cls, clf, name: str | None = None, operating_point: str = "quality") -> Served:
        guard = G.load(clf.path) if getattr(clf, "path", None) is not None else None
        thr = float(clf.thresholds.get(operating_point, 0.5))
        return cls(name or (clf.sha256 or "")[:12], clf, guard, thr)

    def actions(self, reqs: Sequence[RoutingRequest], F: np.ndarray | None = None) -> np.ndarray:
        """1 = transformer, 0 = hybrid, for each request (no exploration)."""
        X = self.clf.features(list(reqs))  # type: ignore[attr-defined]
        if self.guard is None:
            p = self.clf.p_transformer_from_features(X)  # type: ignore[attr-defined]
            return (np.asarray(p) >= self.threshold).astype(int)
        F = G.cluster_features(reqs) if F is None else F
        return self.guard.actions(F, self.clf.gap_from_features(X))  # type: ignore[attr-defined]


@dataclass
class Labelled:
    """One labelled request as the loop keeps it."""

    id: str
    request: RoutingRequest
    action: int  # what the router did (1 = transformer)
    propensity: float
    lt: float
    lh: float
    held: bool = False
    time: float = 0.0  # when it was served (unix seconds; the router's loop uses it)

    def __post_init__(self) -> None:
        self.held = Gt.held_back(self.id)


@dataclass
class LearningLoop:
    base: object  # the artifact candidates start from
    workdir: Path
    refit: str = "warm"
    seed: int = 0
    level: float = Gt.LEVEL
    n_boot: int = Gt.N_BOOT
    min_labels: int = 2 * G.MIN_ROWS
    live: Served | None = None
    previous: Served | None = None
    rows: list[Labelled] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    counters: Counter = field(default_factory=Counter)
    promoted_at: int = 0
    training_data: dict | None = None  # added to candidates' meta.json training_data

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        if self.live is None:
            self.live = Served.of(self.base, "base")

    def add(self, row: Labelled) -> None:
        self.rows.append(row)

    def _event(self, kind: str, **kw) -> dict:
        ev = {"event": kind, "labels": len(self.rows), "live": self.live.name if self.live
              else None, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **kw}
        self.history.append(ev)
        self.counters[kind] += 1
        log.info("learning: %s", {k: v for k, v in ev.items() if k != "guard"})
        return ev

    def _compare(self, serving: Served, candidate: Served, rows: Sequence[Labelled]):
        reqs = [r.request for r in rows]
        F = G.cluster_features(reqs) if rows else None
        a = np.array([r.action for r in rows], int)
        lt = np.array([r.lt for r in rows])
        lh = np.array([r.lh for r in rows])
        s = serving.actions(reqs, F) if rows else np.zeros(0, int)
        c = candidate.actions(reqs, F) if rows else np.zeros(0, int)
        return Gt.compare(s, c, a, np.array([r.propensity for r in rows]),
                          -np.where(a == 1, lt, lh), -lt, -lh, self.level, self.n_boot,
                          self.seed)

    def check_rollback(self) -> dict | None:
        """Roll back when the live policy does worse than the one it replaced on the held-back
        requests that arrived since (None: nothing to do)."""
        if self.previous is None or self.live is None:
            return None
        since = [r for r in self.rows[self.promoted_at:] if r.held]
        if len(since) < Gt.MIN_HELD_BACK:
            return None
        res = self._compare(self.previous, self.live, since)  # live - previous
        if res.n_disagree and res.ci[1] < 0:
            bad = self.live.name
            self.live, self.previous = self.previous, None
            path = getattr(self.live.clf, "path", None)
            # what was restored, named in the event: the same step may promote a candidate
            # after it, so the live policy at the step's end is not necessarily this one
            return self._event("rolled_back", from_=bad, to=self.live.name,
                               to_path=str(path) if path else None, gate=res.to_dict(), reason=(
                f"the live artifact did worse than the one it replaced on {res.n} held-back "
                f"requests since: {res.difference:+.4f} nats/token, CI [{res.ci[0]:+.4f}, "
                f"{res.ci[1]:+.4f}]"))
        return None

    def step(self) -> dict:
        """One retrain (see the module docstring); returns its event."""
        from classifiers import artifact as A
        from router.learning.candidate import fit_candidate

        self.check_rollback()
        train = [r for r in self.rows if not r.held]
        held = [r for r in self.rows if r.held]
        if len(train) < self.min_labels:
            return self._event("skipped", reason=f"{len(train)} training labels (at least "
                               f"{self.min_labels} are needed)")
        out = self.workdir / f"candidate-{len(self.history):04d}"
        try:
            fit = fit_candidate(self.base, [r.request for r in train],
                                np.array([r.lt for r in train]), np.array([r.lh for r in train]),
                                [r.id for r in train], out, self.seed, self.refit,
                                self.training_data)
            cand = Served.of(A.load(out, verify=True, strict=True))
        except (ValueError, A.ArtifactError, OSError) as exc:
            return self._event("failed", reason=f"{type(exc).__name__}: {exc}")
        res = self._compare(self.live, cand, held)  # type: ignore[arg-type]
        common = {"candidate": cand.name, "kept": fit["kept"], "gate": res.to_dict(),
                  "guard": fit["guard"], "held_out_loss": fit["held_out_loss"],
                  "reason": res.reason, "path": str(out)}
        if not res.passed:
            return self._event("refused", **common)
        self.previous, self.live = self.live, cand
        self.promoted_at = len(self.rows)
        return self._event("promoted", **common)
