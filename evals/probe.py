"""How much the prompt probe adds to the request classifier (issue #24 item 4).

``python -m evals.probe --labels data/labels/real.jsonl [--json OUT]`` reads label rows that
carry the probe (``archroute label`` records it: both models' losses on the prompt, by
the study's token categories, :mod:`classifiers.probe`) and prints, with 95% bootstrap CIs:

1. **untrained**: the probe's raw prompt-loss gap as a score (lower gap: the transformer),
   AUC pooled and within each source;
2. **leave-one-source-out** (train on every source but one, test on it): the shipped
   prompt-only classifier against the same model with the probe features added;
3. **within sources** (what the learning loop sees once it has labels of the user's own
   traffic): 5 folds inside every source, both models trained on the other folds of every
   source; pooled AUC and the share of the oracle's gain over the best single backend
   recovered (OGR).

The same model family (:data:`classifiers.training.train_router.SHIPPED`: the gap regressor,
task features + text logit, robust threshold) with and without the probe columns, so the
difference is the probe.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from classifiers.features import FEATURE_NAMES
from classifiers.probe import PROBE_FEATURES
from classifiers.training.labels import MARGIN, require_labels
from classifiers.training.metrics import auc
from classifiers.training.realdata import EVAL_ONLY
from classifiers.training.train_router import (
    SHIPPED,
    VARIANTS,
    RealRouter,
    _take,
    feature_matrix,
    fmt_ci,
    label_arrays,
    leave_one_source_out,
    probe_matrix,
    routing_request,
    routing_summary,
)

NAMES = (*FEATURE_NAMES, *PROBE_FEATURES)


def make_model(with_probe: bool, seed: int = 0) -> RealRouter:
    """The shipped variant, over the request features alone or with the probe's."""
    cfg = dict(VARIANTS[SHIPPED])
    feats = list(cfg.pop("features"))
    if with_probe:
        feats += list(PROBE_FEATURES)
    return RealRouter(seed=seed, feature_mask=np.isin(NAMES, feats), **cfg)


def _auc_ci(y: np.ndarray, s: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    rng = np.random.default_rng(seed)
    n = len(y)
    boots = [auc(y[i], s[i]) for i in (rng.integers(0, n, n) for _ in range(n_boot))]
    b = np.array([v for v in boots if np.isfinite(v)])
    if not len(b):  # one class only: no AUC
        return float("nan"), [float("nan"), float("nan")]
    return auc(y, s), [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))]


def untrained(rows: Sequence[dict], P: np.ndarray, gap: np.ndarray, groups: np.ndarray) -> dict:
    """AUC of the raw prompt-loss gap (``-probe_gap``: a high score = the transformer)."""
    s = -P[:, PROBE_FEATURES.index("probe_gap")]
    keep = (np.abs(gap) > MARGIN) & np.isfinite(s)
    y = (gap < 0).astype(int)
    out = {"pooled": _auc_ci(y[keep], s[keep])}
    for g in sorted(set(groups)):
        k = keep & (groups == g)
        out[g] = _auc_ci(y[k], s[k]) if k.sum() >= 20 else (float("nan"), [np.nan, np.nan])
    return out


def within_sources(X: np.ndarray, reqs: list, rows: Sequence[dict], with_probe: bool,
                   k: int = 5, seed: int = 0) -> dict:
    """k folds inside every trainable source; each fold predicted by a model trained on the
    other folds of every source; the pooled summary of all predictions."""
    gap, lt, lh, groups, units = label_arrays(rows)
    trainable = ~np.isin(groups, list(EVAL_ONLY))
    rng = np.random.default_rng(seed)
    fold = np.full(len(rows), -1)
    for g in set(groups[trainable]):
        idx = np.flatnonzero(groups == g)
        fold[idx] = rng.permutation(len(idx)) % k
    p = np.full(len(rows), np.nan)
    route = np.zeros(len(rows), bool)
    for f in range(k):
        te, tr = fold == f, trainable & (fold != f)
        m = make_model(with_probe, seed).fit(X[tr], _take(reqs, tr), gap[tr], lt[tr], lh[tr], units[tr])
        p[te] = m.predict_proba(X[te], _take(reqs, te))
        route[te] = p[te] >= m.thresholds_["quality"]
    s = trainable
    return routing_summary(p[s], float("nan"), gap[s], lt[s], lh[s], route=route[s])


def run(rows: list[dict], progress: bool = True) -> dict:
    rows = sorted((r for r in rows if r.get("probe")), key=lambda r: (r["group"], r["id"]))
    if not rows:
        raise SystemExit("no label row carries the probe: relabel with this version of "
                         "`archroute label` (it records the probe from the same forward passes)")
    reqs = [routing_request(r) for r in rows]
    X = np.column_stack([feature_matrix(reqs, progress), probe_matrix(rows)])
    gap, _, _, groups, _ = label_arrays(rows)
    res: dict = {"n": len(rows), "untrained": untrained(rows, X[:, len(FEATURE_NAMES):], gap, groups)}
    for name, wp in (("prompt-only", False), ("prompt+probe", True)):
        lo = leave_one_source_out(X, reqs, rows, make_model=lambda wp=wp: make_model(wp),
                                  progress=progress, profiles=("quality",))
        lo.pop("p"), lo.pop("threshold")
        res[f"loso {name}"] = lo["quality"]
        res[f"within {name}"] = within_sources(X, reqs, rows, wp)
    return res


def report(res: dict) -> str:
    u = res["untrained"]
    lines = [f"# The prompt probe ({res['n']} label rows with the probe)", "",
             f"Untrained prompt-loss gap as a score: pooled AUC {fmt_ci(*u['pooled'])}", "",
             "| source | untrained AUC | LOSO prompt-only AUC | LOSO +probe AUC | "
             "LOSO prompt-only regret | LOSO +probe regret |", "|---|---|---|---|---|---|"]
    a, b = res["loso prompt-only"]["per_source"], res["loso prompt+probe"]["per_source"]
    for g in a:
        ug = u.get(g, (float("nan"), [np.nan, np.nan]))
        lines.append(f"| {g} | {fmt_ci(*ug)} | {fmt_ci(a[g]['auc'], a[g]['auc_ci'])} | "
                     f"{fmt_ci(b[g]['auc'], b[g]['auc_ci'])} | {a[g]['regret_vs_best']:+.3f} | "
                     f"{b[g]['regret_vs_best']:+.3f} |")
    lines += ["", "| setting | model | pooled AUC | OGR | regret vs best single |", "|---|---|---|---|---|"]
    for setting in ("loso", "within"):
        for name in ("prompt-only", "prompt+probe"):
            po = res[f"{setting} {name}"]
            po = po.get("pooled", po)
            lines.append(f"| {'leave-one-source-out' if setting == 'loso' else 'within sources (5 folds)'} "
                         f"| {name} | {fmt_ci(po['auc'], po['auc_ci'])} | "
                         f"{fmt_ci(po['recovered'], po['recovered_ci'], '.2f')} | "
                         f"{fmt_ci(po['regret_vs_best'], po['regret_vs_best_ci'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--labels", default="data/labels/real.jsonl",
                    help="label rows with the probe (archroute label --requests ...)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    rows = require_labels(args.labels, latest_only=True)
    res = run(rows, progress=not args.no_progress)
    print(report(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
