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

    python -m classifiers.ceiling --labels data/labels/real.jsonl [--out docs/classifier/ceiling.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from classifiers.realdata import EVAL_ONLY
from classifiers.transfer import label_arrays, routing_summary

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
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m classifiers.ceiling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", required=True, help="label JSONL from `archroute label --requests`")
    ap.add_argument("--out", help="write the figures as JSON here (a Markdown table beside it)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
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
