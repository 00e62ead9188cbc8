"""Does a guard fitted on the shared labels make the shipped classifier safe on new sources?

Measured (2026-12-07, the raw-text pair's 14,120 trainable labels): **no**, so it is not
shipped. Leave-one-source-out, the guarded classifier recovers a little more of the oracle's
gain pooled (+0.13 vs +0.11) but MT-Bench, whose requests look like Dolly's and HH-RLHF's
chats, lands in clusters whose best single backend is the hybrid and loses 0.34 nats/token
against its own best single backend (the classifier alone: +0.006). Clusters learnt on other
sources do not transfer either; the guard is for the user's own traffic (the learning loop
fits it on the decision log). docs/learning-loop.md has the table.

``python -m evals.guard_transfer --labels data/labels/real.jsonl --artifact DIR``

The shipped request classifier (``classifiers/default``) was trained on the shared real
requests; on a source it never saw it can do worse than always sending everything to the best
single backend (issue #24: one held-out source where the hybrid wins 68% of requests went
100% to the transformer; another lost 0.24 nats/token against its best single backend).
The guard (:mod:`router.learning.guard`) keeps a request at its cluster's best single backend
unless the predicted gain clears a threshold whose held-out gain has a lower confidence bound
above zero, and sends traffic unlike every cluster to the best single backend overall.

Here the guard is fitted on every trainable source's labels, each row's predicted gap coming
from a model that never saw its source (leave-one-source-out), and saved as ``guard.json``
beside the artifact, so the ``guarded`` policy (``archroute-auto``) uses it. Before saving,
the same construction is judged leave-one-source-out: for each source, a guard fitted on the
other sources' rows decides its rows (the predictor trained without it); per source and
pooled, the classifier alone and behind its guard against always-transformer,
always-hybrid, the oracle and the best single backend. One approximation, stated: the other
sources' held-out predictions come from models that did see the held-out source (a nested
leave-one-source-out would fit 90 models instead of 10).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def loso_gaps(rows: Sequence[dict], progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-source-out predicted gaps and the calibrated P(transformer better) of the
    shipped variant, one per row (rows of a source predicted by a model trained on the
    others)."""
    from classifiers.training.train_router import (
        SHIPPED,
        _take,
        feature_matrix,
        label_arrays,
        make_router,
        routing_request,
    )

    reqs = [routing_request(r) for r in rows]
    X = feature_matrix(reqs, progress)
    gap, lt, lh, groups, units = label_arrays(rows)
    pred, p = np.zeros(len(rows)), np.zeros(len(rows))
    names = sorted(set(groups))
    it = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc="leave-one-source-out", unit="source")
    for g in it:
        te, tr = groups == g, groups != g
        m = make_router(SHIPPED).fit(X[tr], _take(reqs, tr), gap[tr], lt[tr], lh[tr], units[tr])
        Z = m._stack(X[te], m.text_logits(_take(reqs, te)))
        assert m.clf_ is not None
        pred[te] = -m._raw(m.clf_, Z)  # the regressor's raw score is minus the expected gap
        p[te] = m.predict_proba(X[te], _take(reqs, te))
        thr = m.thresholds_["quality"]
        p[te] = np.where(p[te] >= thr, 1.0, 0.0)  # the classifier's own decision
    return pred, p


def judge(rows: Sequence[dict], pred: np.ndarray, route_clf: np.ndarray) -> dict:
    """Per source and pooled: the classifier alone and behind a guard fitted without that
    source (losses in nats/token, lower is better)."""
    from classifiers.training.train_router import label_arrays, routing_request
    from router.learning.guard import Guard, cluster_features

    gap, lt, lh, groups, _ = label_arrays(rows)
    F = cluster_features([routing_request(r) for r in rows])
    guarded = np.zeros(len(rows), int)
    for g in sorted(set(groups)):
        te, tr = groups == g, groups != g
        guard = Guard().fit(F[tr], pred[tr], lt[tr], lh[tr])
        guarded[te] = guard.actions(F[te], pred[te])
    clf = route_clf.astype(int)

    def summary(s: np.ndarray) -> dict:
        best = min(lt[s].mean(), lh[s].mean())
        oracle = np.minimum(lt[s], lh[s]).mean()
        out: dict = {"n": int(s.sum()), "always_transformer": float(lt[s].mean()),
               "always_hybrid": float(lh[s].mean()), "oracle": float(oracle),
               "best_single": float(best)}
        for name, act in (("classifier", clf), ("guarded", guarded)):
            loss = float(np.where(act[s] == 1, lt[s], lh[s]).mean())
            head = best - oracle
            out[name] = {"loss": loss, "regret_vs_best": loss - best,
                         "recovered": (best - loss) / head if head > 1e-12 else float("nan"),
                         "to_transformer": float(act[s].mean())}
        return out

    per = {g: summary(groups == g) for g in sorted(set(groups))}
    return {"per_source": per, "pooled": summary(np.ones(len(rows), bool))}


def report(res: dict) -> str:
    lines = ["| source | n | best single | classifier regret | guarded regret | "
             "classifier to T | guarded to T |", "|---|---:|---:|---:|---:|---:|---:|"]
    for g, s in [*res["per_source"].items(), ("**pooled**", res["pooled"])]:
        c, q = s["classifier"], s["guarded"]
        lines.append(f"| {g} | {s['n']} | {s['best_single']:.3f} | {c['regret_vs_best']:+.3f} | "
                     f"{q['regret_vs_best']:+.3f} | {c['to_transformer']:.0%} | "
                     f"{q['to_transformer']:.0%} |")
    po = res["pooled"]
    worst = {k: max(s[k]["regret_vs_best"] for s in res["per_source"].values())
             for k in ("classifier", "guarded")}
    lines += ["", f"pooled oracle-gap recovered: classifier {po['classifier']['recovered']:+.2f}, "
                  f"guarded {po['guarded']['recovered']:+.2f}; worst source regret against its "
                  f"best single backend: classifier {worst['classifier']:+.3f}, guarded "
                  f"{worst['guarded']:+.3f} nats/token"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.guard_transfer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--labels", default="data/labels/real.jsonl")
    ap.add_argument("--artifact", default=None,
                    help="write guard.json into this artifact folder (default: judge only)")
    ap.add_argument("--json", default=None, help="also write the evaluation here")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    from classifiers.training.labels import MissingLabelsError, require_labels
    from classifiers.training.realdata import EVAL_ONLY
    from router.learning.guard import Guard, cluster_features, save

    try:
        rows = require_labels(a.labels, latest_only=True)
    except MissingLabelsError as exc:
        print(f"guard_transfer: {exc}", file=sys.stderr)
        return 2
    # the evaluation-only source's licence forbids training: never fitted on
    rows = sorted((r for r in rows if r["group"] not in EVAL_ONLY and r["gap"] == r["gap"]),
                  key=lambda r: (r["group"], r["id"]))
    pred, route_clf = loso_gaps(rows, progress=not a.no_progress)
    res = judge(rows, pred, route_clf)
    print(report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    if a.artifact:
        from classifiers.training.labels import labels_hash
        from classifiers.training.train_router import label_arrays, routing_request

        _, lt, lh, _, _ = label_arrays(rows)
        guard = Guard().fit(cluster_features([routing_request(r) for r in rows]), pred, lt, lh)
        path = save(guard, a.artifact)
        print(f"written: {path} (fitted on {len(rows)} labelled requests, labels "
              f"{labels_hash(rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
