"""Candidate artifacts from labelled traffic: a warm start from the serving model, and its guard.

With a few hundred labels a model fitted from nothing is noisy (the issue's 140-label
artifact sent a copy-heavy source to the hybrid). :func:`fit_candidate` starts from the
base artifact instead (the shipped model, or the model a simulation trained on the other
sources): LightGBM continues boosting the base's gap regressor (``init_model``) on the new
labels, :data:`ROUNDS_PER_LABEL` trees per 10 labels at a small learning rate, so the new
trees correct the base where the traffic says it is wrong and leave it alone elsewhere.
The base's text model and calibration are kept (same features, same scale).

The guard (:mod:`router.learning.guard`) is fitted on held-out predictions of the same rows
(:data:`FOLDS` folds by request id: each row predicted by a model that did not see it). Two
candidates are built, the base with a guard and the warm start with a guard, and the one
with less loss on those held-out predictions is saved: a warm start that does not help on
the traffic's own labels is not shipped. ``refit="scratch"`` fits the shipped variant from
nothing on the labels (:func:`classifiers.training.train_router.fit_quick`'s model) instead: the
comparison the docs report.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from classifiers.request import RoutingRequest
from router.learning import guard as G

FOLDS = 4
LEARNING_RATE = 0.05
ROUNDS_PER_LABEL = 0.1  # continued-boosting rounds per label, clipped to [10, 100]
REFITS = ("warm", "scratch", "base")


class _Fitted:
    """What :func:`classifiers.artifact.save` reads of a fitted model: its booster."""

    def __init__(self, booster) -> None:
        self.booster_ = booster


def fold_of(request_id: str, k: int = FOLDS) -> int:
    return int(hashlib.sha256(f"fold:{request_id}".encode()).hexdigest(), 16) % k


def warm_booster(base, X: np.ndarray, gap: np.ndarray, seed: int = 0):
    """The base artifact's gap booster, boosted further on (X, gap); the base is unchanged."""
    import lightgbm as lgb

    n = len(gap)
    params = {"objective": "regression", "learning_rate": LEARNING_RATE, "num_leaves": 4,
              "min_data_in_leaf": max(5, n // 20), "lambda_l2": 1.0, "verbose": -1,
              "num_threads": 1, "seed": seed, "deterministic": True}
    rounds = int(np.clip(ROUNDS_PER_LABEL * n, 10, 100))
    return lgb.train(params, lgb.Dataset(X, np.clip(gap, -3.0, 3.0)), num_boost_round=rounds,
                     init_model=base.regressor)


def _scratch(X_task: np.ndarray, reqs: Sequence[RoutingRequest], gap, lt, lh, units, seed):
    from classifiers.training.train_router import SHIPPED, make_router

    return make_router(SHIPPED, seed).fit(X_task, list(reqs), gap, lt, lh, units)


def fit_candidate(base, reqs: Sequence[RoutingRequest], lt: np.ndarray, lh: np.ndarray,
                  ids: Sequence[str], out_dir: str | Path, seed: int = 0,
                  refit: str = "warm", training_data: dict | None = None) -> dict:
    """Fit, guard and save a candidate artifact (with ``guard.json``) to ``out_dir``.
    ``base``: a loaded :class:`~classifiers.artifact.RequestClassifier` whose gap regressor
    is its classifier (the shipped variant). Returns a summary: which model was kept, the
    held-out loss of each, the guard."""
    from classifiers import artifact as A
    from classifiers.training.train_router import feature_matrix, quality_threshold

    if refit not in REFITS:
        raise ValueError(f"refit must be one of {REFITS}, got {refit!r}")
    if base.regressor is None or not base.meta.get("regressor_is_classifier"):
        raise ValueError("the base artifact is not the shipped variant (a gap regressor)")
    t0 = time.perf_counter()
    lt, lh = np.asarray(lt, float), np.asarray(lh, float)
    gap = lt - lh
    X = base.features(list(reqs))
    F = G.cluster_features(reqs)
    folds = np.array([fold_of(i) for i in ids])
    pred = {"base": base.gap_from_features(X)}  # the base never saw these rows: held out
    if refit == "scratch":
        X_all = feature_matrix(reqs, progress=False)
        units = np.array([f"log/part{f}" for f in folds])
    if refit != "base":
        oof = np.zeros(len(gap))
        for f in range(FOLDS):
            te = folds == f
            if not te.any() or te.all():
                continue
            if refit == "warm":
                oof[te] = warm_booster(base, X[~te], gap[~te], seed).predict(X[te],
                                                                               num_threads=1)
            else:
                m = _scratch(X_all[~te], _take(reqs, ~te), gap[~te], lt[~te], lh[~te],
                             units[~te], seed)
                oof[te] = _scratch_gap(m, X_all[te], _take(reqs, te))
        pred[refit] = oof
    guards, loss = {}, {}
    for name, p in pred.items():
        guards[name] = G.Guard(seed=seed).fit(F, p, lt, lh)
        act = guards[name].actions(F, p)
        loss[name] = float(np.where(act == 1, lt, lh).mean())
    keep = min(loss, key=lambda k: (loss[k], k != "base"))  # ties: the base
    scratch = None
    if keep == "warm":
        booster = warm_booster(base, X, gap, seed)
        text, cal, feats = base.text, base.calibration, base.feature_names
    elif keep == "scratch":
        scratch = _scratch(X_all, list(reqs), gap, lt, lh, units, seed)
        cal = (-scratch.calibration_[0], scratch.calibration_[1])  # as save_shipped writes it
    else:
        booster, text, cal, feats = (base.classifier, base.text, base.calibration,
                                     base.feature_names)
    # the artifact's own operating points, on the kept model's held-out predictions
    a, b = cal
    p_oof = 1.0 / (1.0 + np.exp(-np.clip(a * pred[keep] + b, -50, 50)))
    thresholds = {"quality": quality_threshold(p_oof, lt, lh),
                  "cost": quality_threshold(p_oof, lt, lh, max_transformer=0.5)}
    meta = {"margin": base.meta.get("margin", 0.05), "center": 0.0,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "thresholds": thresholds,
            "training_data": {"kind": f"learning loop ({keep})", "base": base.sha256,
                              "n_train": len(gap), "refit": refit, "kept": keep,
                              "held_out_loss": loss, **(training_data or {})},
            "guard": guards[keep].summary()}
    if scratch is not None:
        from classifiers.training.train_router import save_shipped

        save_shipped(scratch, out_dir, meta)
    else:
        fitted = _Fitted(booster)
        A.save(out_dir, fitted, fitted, meta, text=text, calibration=cal,
               feature_names=[n for n in feats if n != A.TEXT_FEATURE])
    G.save(guards[keep], out_dir)
    clf = A.load(out_dir, verify=True, strict=True)  # as a reload will
    return {"kept": keep, "held_out_loss": loss, "guard": guards[keep].summary(),
            "sha256": clf.sha256, "n_train": len(gap), "fit_s": time.perf_counter() - t0}


def _take(reqs: Sequence[RoutingRequest], mask: np.ndarray) -> list[RoutingRequest]:
    return [reqs[int(i)] for i in np.flatnonzero(mask)]


def _scratch_gap(m, X_all: np.ndarray, reqs: Sequence[RoutingRequest]) -> np.ndarray:
    """A scratch model's predicted gap (the regressor kind's booster predicts it)."""
    return np.asarray(m.clf_.predict(m._stack(X_all, m.text_logits(reqs))))
