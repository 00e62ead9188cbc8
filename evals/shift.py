"""``archroute eval --simulate-shift``: a new source arrives; does the loop learn it safely?

For each source in turn (issue #24, item 6): the shipped variant is trained on every other
trainable source (the "shipped" model for this run), then that source's labelled requests
arrive as live traffic. Half of them (a hash of the id) are the stream, the other half the
evaluation set. Each streamed request is routed by the live policy with ``epsilon``
exploration (propensity recorded), then its reference arrives (both losses: a label), and
every ``retrain_every`` labels the loop steps (:class:`router.learning.loop.LearningLoop`:
rollback check, warm-started guarded candidate, the DR gate on held-back requests), the
same code a router runs. After 0, 100, 300 and 1,000 labels (or all the stream has) the
live policy, without exploration, routes the evaluation half; both losses are known there,
so its exact loss, its regret against that source's best single backend and the share of
the oracle's gain it recovers (OGR) are printed with 95% bootstrap CIs, per source and
pooled. The bars (issue #24): never worse than the source's best single backend by more
than 0.05 nats/token at any evaluated point from the first checkpoint (100 labels) on (the
points before it are printed too: the base model, nothing learnt yet), within 0.03 after <= 300 labels, pooled OGR
>= 0.3 after <= 1,000.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CHECKPOINTS = (100, 300, 1000)
BAR_ANY, BAR_300, BAR_OGR = 0.05, 0.03, 0.3


def _eval_half(rid: str) -> bool:
    return int(hashlib.sha256(f"shift-eval:{rid}".encode()).hexdigest(), 16) % 2 == 0


def simulate_source(rows: Sequence[dict], source: str, workdir: Path, *, epsilon: float = 0.1,
                    retrain_every: int = 50, checkpoints: Sequence[int] = CHECKPOINTS,
                    refit: str = "warm", seed: int = 0, n_boot: int = 300,
                    gate_level: float | None = None) -> dict:
    """One source as the new traffic; returns its evaluations and the loop's history."""
    from classifiers import artifact as A
    from classifiers.training.realdata import EVAL_ONLY
    from classifiers.training.train_router import (
        SHIPPED,
        feature_matrix,
        label_arrays,
        make_router,
        routing_request,
        routing_summary,
        save_shipped,
    )
    from router.learning.guard import cluster_features
    from router.learning.loop import Labelled, LearningLoop

    train = [r for r in rows if r["group"] != source and r["group"] not in EVAL_ONLY]
    new = [r for r in rows if r["group"] == source]
    reqs = [routing_request(r) for r in train]
    gap, lt, lh, _, units = label_arrays(train)
    model = make_router(SHIPPED, seed).fit(feature_matrix(reqs, progress=False), reqs, gap, lt,
                                           lh, units)
    base_dir = workdir / "base"
    save_shipped(model, base_dir, {"margin": 0.05, "center": 0.0,
                                   "thresholds": model.thresholds_,
                                   "training_data": {"kind": "shift simulation base",
                                                     "held_out_source": source}})
    base = A.load(base_dir, verify=True, strict=True)
    loop = LearningLoop(base, workdir, refit=refit, seed=seed, n_boot=n_boot,
                        level=0.95 if gate_level is None else gate_level)
    ev_rows = [r for r in new if _eval_half(r["id"])]
    stream = [r for r in new if not _eval_half(r["id"])]
    rng = np.random.default_rng(seed)
    stream = [stream[i] for i in rng.permutation(len(stream))]
    ev_reqs = [routing_request(r) for r in ev_rows]
    ev_F = cluster_features(ev_reqs) if ev_reqs else None
    ev_gap, ev_lt, ev_lh, _, _ = label_arrays(ev_rows) if ev_rows else (np.zeros(0),) * 5
    marks = sorted({0, *[c for c in checkpoints if c < len(stream)], len(stream)}
                   if stream else {0})
    marks = [m for m in marks if m <= max(checkpoints)]
    evals: list[dict] = []

    def evaluate(n_labels: int) -> None:
        live = loop.live
        assert live is not None
        route = live.actions(ev_reqs, ev_F).astype(bool)
        clf: Any = live.clf
        p = np.asarray(clf.p_transformer_from_features(clf.features(ev_reqs)))
        s = routing_summary(p, 0.5, ev_gap, ev_lt, ev_lh, n_boot=n_boot, seed=seed, route=route)
        evals.append({"labels": n_labels, "live": live.name, "n_eval": s["n"],
                      "regret": s["regret_vs_best"], "regret_ci": s["regret_vs_best_ci"],
                      "ogr": s["recovered"], "ogr_ci": s["recovered_ci"],
                      "to_transformer": s["routed_transformer"], "best_single": s["best_single"],
                      "route": route.tolist()})

    if ev_rows:
        evaluate(0)
    for i, r in enumerate(stream[:max(marks)]):
        q = routing_request(r)
        pick = int(loop.live.actions([q])[0])  # type: ignore[union-attr]
        explore = bool(rng.random() < epsilon)
        action = 1 - pick if explore else pick
        loop.add(Labelled(r["id"], q, action, epsilon if explore else 1.0 - epsilon,
                          float(r["loss_transformer"]), float(r["loss_hybrid"])))
        n = i + 1
        if n % retrain_every == 0 or n in marks:
            loop.step()
            if ev_rows:
                evaluate(n)
    return {"source": source, "n_stream": len(stream), "n_eval": len(ev_rows),
            "marks": [m for m in marks if m > 0], "evaluations": evals,
            "history": [{k: v for k, v in e.items() if k not in ("guard", "path")}
                        for e in loop.history], "counters": dict(loop.counters),
            "eval_losses": {"lt": ev_lt.tolist(), "lh": ev_lh.tolist()}}


def _at(res: dict, checkpoint: int) -> Any:
    """The evaluation after ``checkpoint`` labels (or after all the stream had, if fewer)."""
    evs = [e for e in res["evaluations"] if e["labels"] <= checkpoint]
    return evs[-1] if evs else None


def pooled(results: Sequence[dict], checkpoint: int, n_boot: int, seed: int) -> dict | None:
    """OGR and regret over every source's evaluation half together, at a checkpoint."""
    from classifiers.training.train_router import routing_summary

    parts = [(r, _at(r, checkpoint)) for r in results]
    parts = [(r, e) for r, e in parts if e is not None]
    if not parts:
        return None
    lt = np.concatenate([r["eval_losses"]["lt"] for r, _ in parts])
    lh = np.concatenate([r["eval_losses"]["lh"] for r, _ in parts])
    route = np.concatenate([np.array(e["route"], dtype=bool) for _, e in parts])
    s = routing_summary(route.astype(float), 0.5, lt - lh, lt, lh, n_boot=n_boot, seed=seed,
                        route=route)
    return {"ogr": s["recovered"], "ogr_ci": s["recovered_ci"], "regret": s["regret_vs_best"],
            "regret_ci": s["regret_vs_best_ci"], "n": s["n"]}


def report(results: Sequence[dict], checkpoints: Sequence[int], n_boot: int, seed: int) -> str:
    def ci(v, c, f="+.3f"):
        return "–" if v is None or v != v else f"{v:{f}} [{c[0]:{f}}, {c[1]:{f}}]"

    lines = ["| source | stream / eval | labels | live | to T | regret vs best single [95% CI] "
             "| OGR [95% CI] |", "| --- | ---: | ---: | --- | ---: | --- | --- |"]
    for r in results:
        for e in r["evaluations"]:
            if e["labels"] in (0, *checkpoints) or e["labels"] == r["n_stream"]:
                lines.append(f"| {r['source']} | {r['n_stream']} / {r['n_eval']} | {e['labels']} "
                             f"| {e['live']} | {e['to_transformer']:.0%} | "
                             f"{ci(e['regret'], e['regret_ci'])} | "
                             f"{ci(e['ogr'], e['ogr_ci'], '+.2f')} |")
    lines += ["", "| labels | pooled OGR [95% CI] | pooled regret | worst source regret |",
              "| ---: | --- | --- | ---: |"]
    for c in (0, *checkpoints):
        p = pooled(results, c, n_boot, seed)
        worst = max((e["regret"] for r in results if (e := _at(r, c)) is not None),
                    default=float("nan"))
        if p:
            lines.append(f"| {c} | {ci(p['ogr'], p['ogr_ci'], '+.2f')} | "
                         f"{ci(p['regret'], p['regret_ci'])} | {worst:+.3f} |")
    lines += ["", *bars(results, checkpoints, n_boot, seed)]
    return "\n".join(lines)


def bars(results: Sequence[dict], checkpoints: Sequence[int], n_boot: int,
         seed: int) -> list[str]:
    """The issue's bars, each PASS or FAIL with the number that decided it (regret: live
    loss minus the best single backend's, nats/token; positive is worse)."""
    first = min(checkpoints)  # before it, the live policy is the base (nothing learnt yet)
    evals = [(r["source"], e) for r in results for e in r["evaluations"]
             if e["labels"] >= min(first, r["n_stream"])]
    worst_any = max(evals, key=lambda se: se[1]["regret"], default=None)
    after300 = [(r["source"], _at(r, 300)) for r in results]
    after300 = [(s, e) for s, e in after300 if e is not None and e["labels"] > 0]
    worst300 = max(after300, key=lambda se: se[1]["regret"], default=None)
    top = max(checkpoints)
    p = pooled(results, top, n_boot, seed)
    out = []
    if worst_any:
        s, e = worst_any
        out.append(f"{'PASS' if e['regret'] <= BAR_ANY else 'FAIL'}: at every evaluated point "
                   f"from {first} labels on within {BAR_ANY} of the best single backend (worst: {s} after "
                   f"{e['labels']} labels, {e['regret']:+.3f})")
    if worst300:
        s, e = worst300
        out.append(f"{'PASS' if e['regret'] <= BAR_300 else 'FAIL'}: within {BAR_300} after "
                   f"<= 300 labels (worst: {s} after {e['labels']}, {e['regret']:+.3f})")
    if p:
        out.append(f"{'PASS' if p['ogr'] >= BAR_OGR else 'FAIL'}: pooled OGR >= {BAR_OGR} "
                   f"after <= {top} labels ({p['ogr']:+.2f} [{p['ogr_ci'][0]:+.2f}, "
                   f"{p['ogr_ci'][1]:+.2f}])")
    return out


def plot(results: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in results:
        xs = [e["labels"] for e in r["evaluations"]]
        ax.plot(xs, [e["regret"] for e in r["evaluations"]], marker=".", lw=1, label=r["source"])
    ax.axhline(BAR_ANY, color="#c00", ls="--", lw=1, label=f"bar: {BAR_ANY}")
    ax.axhline(BAR_300, color="#e80", ls=":", lw=1, label=f"bar after 300: {BAR_300}")
    ax.axhline(0, color="#999", lw=0.8)
    ax.set_xlabel("labelled requests from the new source")
    ax.set_ylabel("regret vs its best single backend (nats/token)")
    ax.set_title("shift simulation: each source in turn as the new traffic", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(labels: str, out: str | None = None, sources: Sequence[str] | None = None,
        limit: int | None = None, epsilon: float = 0.1, retrain_every: int = 50,
        refit: str = "warm", seed: int = 0, n_boot: int = 300, progress: bool = True,
        checkpoints: Sequence[int] = CHECKPOINTS, gate_level: float | None = None) -> int:
    """The command: every (or each named) source in turn; prints the tables and the bars,
    writes ``shift.json``, ``shift.md`` and ``shift.png`` to ``out``."""
    import sys

    from classifiers.training.labels import MissingLabelsError, require_labels

    if not 0 <= epsilon <= 0.5:
        print(f"archroute eval --simulate-shift: --epsilon must be in [0, 0.5], got {epsilon}",
              file=sys.stderr)
        return 2
    if retrain_every < 1:
        print("archroute eval --simulate-shift: --retrain-every must be at least 1",
              file=sys.stderr)
        return 2
    if gate_level is not None and not 0.5 <= gate_level < 1:
        print(f"archroute eval --simulate-shift: --gate-level must be in [0.5, 1), got {gate_level}",
              file=sys.stderr)
        return 2
    try:
        rows = [r for r in require_labels(labels, latest_only=True)
                if r["gap"] == r["gap"] and "group" in r]
    except MissingLabelsError as exc:
        print(f"archroute eval --simulate-shift: {exc}", file=sys.stderr)
        return 2
    from classifiers.training.realdata import EVAL_ONLY

    # an evaluation-only source (its licence forbids training) is never streamed: the loop
    # would train on its labels
    names = sorted({r["group"] for r in rows} - set(EVAL_ONLY))
    if sources and set(sources) & set(EVAL_ONLY):
        print(f"archroute eval --simulate-shift: {sorted(set(sources) & set(EVAL_ONLY))} is "
              "for evaluation only: the loop would train on it", file=sys.stderr)
        return 2
    if sources:
        unknown = sorted(set(sources) - set(names))
        if unknown:
            print(f"archroute eval --simulate-shift: no labels for {unknown} (sources: {names})",
                  file=sys.stderr)
            return 2
        names = list(sources)
    if len(names) < 1 or len({r["group"] for r in rows}) < 2:
        print("archroute eval --simulate-shift: needs labels of at least two sources",
              file=sys.stderr)
        return 2
    if limit:
        per: dict[str, int] = {}
        kept = []
        for r in rows:
            per[r["group"]] = per.get(r["group"], 0) + 1
            if per[r["group"]] <= limit:
                kept.append(r)
        rows = kept
    out_dir = Path(out or "eval-out/shift")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    it = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc="shift simulation", unit="source")
    with tempfile.TemporaryDirectory(prefix="archroute-shift-") as tmp:
        for s in it:
            results.append(simulate_source(rows, s, Path(tmp) / s, epsilon=epsilon,
                                           retrain_every=retrain_every, checkpoints=checkpoints,
                                           refit=refit, seed=seed, n_boot=n_boot,
                                           gate_level=gate_level))
    md = report(results, checkpoints, n_boot, seed)
    head = (f"shift simulation: {len(names)} sources, epsilon {epsilon}, retrain every "
            f"{retrain_every} labels, refit {refit}, seed {seed}, gate CI "
            f"{gate_level or 0.95:.0%}, {time.perf_counter() - t0:.0f} s")
    print(head + "\n\n" + md)
    (out_dir / "shift.md").write_text(head + "\n\n" + md + "\n")
    (out_dir / "shift.json").write_text(json.dumps(
        {"settings": {"labels": labels, "sources": names, "limit": limit, "epsilon": epsilon,
                      "retrain_every": retrain_every, "refit": refit, "seed": seed,
                      "gate_level": gate_level or 0.95,
                      "checkpoints": list(checkpoints)},
         "results": [{k: v for k, v in r.items() if k != "eval_losses"} for r in results]},
        default=float) + "\n")
    plot(results, out_dir / "shift.png")
    print(f"written: {out_dir / 'shift.md'}, shift.json, shift.png")
    return 0
