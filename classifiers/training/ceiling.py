"""How much of the oracle's gain a request router could recover at all: hindsight ceilings.

Issue #11 asks a prompt-only router to recover at least 0.4 of the per-request oracle's gain
over the best single backend, held out by source. This module measures what routers that
know *more* than the prompt would recover on the same labels, chosen in hindsight on the very
rows they are judged on (so each is an upper bound for its kind of knowledge):

- ``source``: the better backend of each source (knows which benchmark a request is from);
- ``source/kind``: the better backend of each source and task kind;
- ``copy4>c``: the transformer when the *reference answer's* ``copy4_share`` (the share of its
  tokens that complete a 4-gram seen before) exceeds c, the best c in hindsight. The share is
  a property of the answer, not of the prompt: no prompt-only router can know it;
- ``source/kind + copy4``: the best copy-share cut inside each source/kind cell.

It also splits the oracle's gain into the part *between* source/kind cells (what knowing the
kind buys) and the part *inside* each cell (what only a within-kind prediction can reach).

    python -m classifiers.training.ceiling --labels data/labels/real.jsonl [--out docs/classifier/ceiling.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from classifiers.training.realdata import EVAL_ONLY
from classifiers.training.train_router import label_arrays, routing_summary

CUTS = np.round(np.arange(0.0, 0.61, 0.01), 2)


def _best_per_cell(cells: np.ndarray, lt: np.ndarray, lh: np.ndarray) -> np.ndarray:
    """Route each cell, as a whole, to its better backend (True = transformer)."""
    route = np.zeros(len(cells), bool)
    for c in np.unique(cells):
        m = cells == c
        route[m] = lt[m].mean() <= lh[m].mean()
    return route


def _best_cut(share: np.ndarray, lt: np.ndarray, lh: np.ndarray) -> tuple[float, np.ndarray]:
    """The copy-share cut with the least mean loss (ties: the smaller cut)."""
    losses = [np.where(share > c, lt, lh).mean() for c in CUTS]
    c = float(CUTS[int(np.argmin(losses))])
    return c, share > c


def ceilings(rows: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Hindsight routers' figures (``routing_summary``'s, with 95% bootstrap CIs) on the
    trainable rows pooled, and the oracle's gain split into between- and within-cell parts."""
    rows = [r for r in rows if r["group"] not in EVAL_ONLY]
    if not rows:
        raise ValueError("no trainable label rows")
    gap, lt, lh, groups, units = label_arrays(rows)
    share = np.array([float(r.get("copy4_share") or 0.0) for r in rows])
    cut, by_share = _best_cut(share, lt, lh)
    by_cell_share = np.zeros(len(rows), bool)
    cell_cuts = {}
    for u in np.unique(units):
        m = units == u
        cell_cuts[str(u)], by_cell_share[m] = _best_cut(share[m], lt[m], lh[m])
    routes = {"source": _best_per_cell(groups, lt, lh),
              "source/kind": _best_per_cell(units, lt, lh),
              f"copy4>{cut:g}": by_share,
              "source/kind + copy4": by_cell_share}
    p = np.zeros(len(rows))  # routing_summary's AUC needs a score; these routers have none
    out: dict = {"n": len(rows), "routers": {}}
    for name, route in routes.items():
        s = routing_summary(p, 0.5, gap, lt, lh, n_boot=n_boot, seed=seed, route=route)
        out["routers"][name] = {k: s[k] for k in ("routed_transformer", "loss", "recovered",
                                                  "recovered_ci", "best_single")}
    # the oracle's gain over the pool's best single backend, split by cell
    best = min(lt.mean(), lh.mean())
    oracle = np.minimum(lt, lh)
    cells: list[dict] = []
    for u in np.unique(units):
        m = units == u
        inside = min(lt[m].mean(), lh[m].mean()) - oracle[m].mean()
        cells.append({"cell": str(u), "n": int(m.sum()), "within_gain": float(inside),
                      "pooled_share": float(inside * m.sum() / len(rows)),
                      "copy4_cut": cell_cuts[str(u)]})
    cells.sort(key=lambda c: -c["pooled_share"])
    total = best - oracle.mean()
    within = float(sum(c["pooled_share"] for c in cells))
    out.update({"oracle_gain": float(total), "within_cells": float(within),
                "between_cells": float(total - within), "cells": cells})
    return out


def in_distribution(rows: Sequence[dict], k: int = 5, seed: int = 0, n_boot: int = 1000,
                    progress: bool = True) -> dict:
    """The shipped model (``classifiers.training.train_router.SHIPPED``) under k-fold *random* CV of the
    trainable rows: every source and kind is in training, the most favourable setting there
    is. Per source/kind cell: the AUC of its out-of-fold scores inside the cell, and the
    share of the cell's own oracle gain (over the cell's better backend) it recovers at the
    expected-gap threshold (0.5) and at the best threshold for that cell in hindsight. It
    says whether the prompt carries the within-kind signal at all."""
    from classifiers.training.metrics import auc as roc_auc
    from classifiers.training.train_router import (
        SHIPPED,
        _take,
        feature_matrix,
        make_router,
        routing_request,
    )

    rows = sorted((r for r in rows if r["group"] not in EVAL_ONLY), key=lambda r: (r["group"], r["id"]))
    reqs = [routing_request(r) for r in rows]
    X = feature_matrix(reqs, progress)
    gap, lt, lh, _, units = label_arrays(rows)
    fold = np.random.default_rng(seed).integers(0, k, len(rows))
    p = np.zeros(len(rows))
    for f in range(k):
        te, tr = fold == f, fold != f
        m = make_router(SHIPPED, seed).fit(X[tr], _take(reqs, tr), gap[tr], lt[tr], lh[tr], units[tr])
        p[te] = m.predict_proba(X[te], _take(reqs, te))
        if progress:
            print(f"fold {f + 1}/{k} done", flush=True)
    out: dict = {"k": k, "pooled": routing_summary(p, 0.5, gap, lt, lh, n_boot=n_boot, seed=seed),
                 "cells": []}
    for u in np.unique(units):
        m_ = units == u
        cl_t, cl_h, pu, gu = lt[m_], lh[m_], p[m_], gap[m_]
        best, orc = min(cl_t.mean(), cl_h.mean()), np.minimum(cl_t, cl_h).mean()
        head = best - orc
        keep = np.abs(gu) > 0.05

        def rec(route: np.ndarray, best=best, head=head, cl_t=cl_t, cl_h=cl_h) -> float:
            return float((best - np.where(route, cl_t, cl_h).mean()) / head) if head > 1e-9 else float("nan")

        cuts = np.unique(np.concatenate([[0.0, 1.01], pu]))
        out["cells"].append({
            "cell": str(u), "n": int(m_.sum()), "within_gain": float(head),
            "auc": roc_auc((gu[keep] < 0).astype(int), pu[keep]) if keep.any() else float("nan"),
            "recovered_at_0.5": rec(pu >= 0.5),
            "recovered_best_cut_hindsight": max(rec(pu >= c) for c in cuts)})
    out["cells"].sort(key=lambda c: -c["within_gain"] * c["n"])
    return out


def ceiling_table(res: dict) -> str:
    """Markdown: the hindsight routers, then the cells holding most of the within-cell gain."""
    lines = ["| hindsight router | to transformer | loss | oracle gap recovered [95% CI] |",
             "| --- | ---: | ---: | --- |"]
    for name, r in res["routers"].items():
        lo, hi = r["recovered_ci"]
        lines.append(f"| {name} | {r['routed_transformer']:.0%} | {r['loss']['router']:.3f} | "
                     f"{r['recovered']:.2f} [{lo:.2f}, {hi:.2f}] |")
    lines += ["", f"Oracle gain over the best single backend: {res['oracle_gain']:.4f} nats/token, "
              f"{res['between_cells']:.4f} between source/kind cells and "
              f"{res['within_cells']:.4f} inside them.", "",
              "| source/kind cell | n | oracle gain inside the cell | share of the pooled gain |",
              "| --- | ---: | ---: | ---: |"]
    for c in res["cells"]:
        if c["pooled_share"] < 1e-3:
            continue
        lines.append(f"| {c['cell']} | {c['n']} | {c['within_gain']:.3f} | "
                     f"{c['pooled_share'] / res['oracle_gain']:.0%} |")
    ind = res.get("in_distribution")
    if ind:
        po = ind["pooled"]
        lo, hi = po["recovered_ci"]
        lines += ["", f"The shipped model under {ind['k']}-fold random CV (every kind in training): "
                  f"pooled AUC {po['auc']:.3f}, recovered {po['recovered']:.2f} [{lo:.2f}, {hi:.2f}] "
                  "at threshold 0.5. Inside each cell (its own oracle gain over its better backend):",
                  "", "| source/kind cell | n | AUC inside the cell | recovered at 0.5 | "
                  "recovered, best cut in hindsight |", "| --- | ---: | ---: | ---: | ---: |"]
        for c in ind["cells"]:
            if c["within_gain"] * c["n"] / res["n"] < 1e-3:
                continue
            lines.append(f"| {c['cell']} | {c['n']} | {c['auc']:.3f} | {c['recovered_at_0.5']:.2f} | "
                         f"{c['recovered_best_cut_hindsight']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m classifiers.training.ceiling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", required=True, help="label JSONL from `archroute label --requests`")
    ap.add_argument("--out", help="write the figures as JSON here (a Markdown table beside it)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--in-distribution", type=int, default=0, metavar="K",
                    help="also fit the shipped model under K-fold random CV (every kind in "
                         "training) and report its skill inside each source/kind cell "
                         "(about 2 min a fold on 2 cores)")
    args = ap.parse_args(argv)
    path = Path(args.labels)
    if not path.is_file():
        print(f"error: no label file at {path}", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in path.open() if line.strip()]
    try:
        res = ceilings(rows, n_boot=args.bootstrap)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.in_distribution:
        res["in_distribution"] = in_distribution(rows, k=args.in_distribution, n_boot=args.bootstrap)
    table = ceiling_table(res)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
