"""Choosing a mixing gate's margin, tilt and lock without looking at the source it is judged on.

    python -m evals.span.tilt --per-source 100 --train-functions 200 --loso-dir runs/span-tilt/loso

A mixing gate (``learned+copy-8-prompt-2+mix-M-tilt-B``, :class:`models.span.gates.MixGate`)
has two settings: the margin M (mix where the gate's score is within M nats of its boundary)
the tilt B (the transformer's weight there is ``sigmoid(B * s)``, ``s`` the score's
signed distance from the boundary; 0 = the 50/50 mixture) and the lock L (``-lock-L``: a
locked copy's token is the mixture with the transformer's log-odds L; 0 = the transformer
alone, no ``-lock``). This picks them the way
span-eval's ``learned-loso`` picks the gate: for each source of the real suite, the gate
trained without it (the same folds, :func:`evals.span.train.loso_gates`; saved to and
reused from ``--loso-dir``), wrapped with each (M, B, L), rolled out on that source's requests
(teacher-forced, span-eval's cached per-token scores). The **nested** choice for a source is
the (M, B, L) of least pooled loss on the *other* sources; its loss on the source itself is the
held-out figure. Requests of evaluation-only files are judged by the gate trained on every
source, with the (M, B, L) of least loss on all training sources.

Printed: the grid (every (M, B, L) pooled over the real suite: held out by source for the
gate, in hindsight for M, B and L), the nested picks per source, and the nested policy's pooled loss
against always-transformer and the 50/50 mixture (paired 95% bootstrap CIs over requests).
Figures, not a test.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MARGINS = (1.0, 2.0)
TILTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
LOCKS = (0.0, 1.0, 2.0, 3.0)  # 0: a locked copy's token is the transformer's alone

Setting = tuple[float, ...]  # (margin M, tilt B, lock L)


def nested_choice(nll: Mapping[str, Mapping[Setting, float]], held: Sequence[str]
                  ) -> dict[str, Setting]:
    """For each source of ``nll`` ({source: {(M, B): summed nats}}), the setting of least
    summed loss over the sources in ``held`` other than itself (a source not in ``held`` is
    judged with the setting of least loss over all of ``held``). Ties: the smaller setting."""
    settings = sorted(next(iter(nll.values())))
    out = {}
    for src in nll:
        others = [o for o in held if o != src]
        out[src] = min(settings, key=lambda st: (sum(nll[o][st] for o in others), st))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.span.tilt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-source", type=int, default=100, help="requests per request file")
    p.add_argument("--train-functions", type=int, default=200,
                   help="function-completion training requests (as span-eval's)")
    p.add_argument("--base", default="+copy-8-prompt-2",
                   help="wrappers between the learned gate and +mix (default +copy-8-prompt-2)")
    p.add_argument("--margins", default=",".join(f"{m:g}" for m in MARGINS))
    p.add_argument("--tilts", default=",".join(f"{b:g}" for b in TILTS))
    p.add_argument("--locks", default=",".join(f"{x:g}" for x in LOCKS))
    p.add_argument("--loso-dir", type=Path, default=Path("runs/span-tilt/loso"),
                   help="the leave-one-source-out gates: loaded when all are there, else "
                        "trained (about 10 minutes) and saved")
    p.add_argument("--bootstrap", type=int, default=1000)
    a = p.parse_args(argv)

    from evals.analysis.stats import cluster_weights
    from evals.span.evaluate import _ci, mixture_lp, role_stats, rollout_weights
    from evals.span.report import _ci as fmt
    from evals.span.run import SpanConfig, load_pair, load_suites, training_seqs
    from evals.span.score import score_suite, token_texts
    from evals.span.train import loso_gates, train_gate
    from models.span.gates import wrap
    from models.span.learned import load_learned_gate

    margins = [float(x) for x in a.margins.split(",")]
    tilts = [float(x) for x in a.tilts.split(",")]
    locks = [float(x) for x in a.locks.split(",")]
    cfg = SpanConfig(suites=["real"], per_source=a.per_source, train_functions=a.train_functions)
    pair = load_pair(cfg)
    tt = token_texts(pair[0])
    (suite,) = load_suites(cfg)
    real = score_suite(suite.requests, "real", pair[0], pair[1], cfg.cache_dir, cfg.batch_size)
    train, _ = training_seqs(cfg, pair, True, {"real": real})
    held = sorted({s.source for s in train if s.suite == "real"})
    d = a.loso_dir
    if not all((d / f"{s}.json").is_file() for s in [*held, "_all"]):
        for src, g in loso_gates(train, tt, sources=held, progress=True).items():
            g.save(d / f"{src}.json")
        train_gate(train, tt, meta={"held_out": None}).save(d / "_all.json")
    folds = {s: load_learned_gate(d / f"{s}.json") for s in held}
    full = load_learned_gate(d / "_all.json")

    # one roll-out per margin: the mixing decisions do not depend on the tilt or the lock,
    # and at tilt 1 the weight's log-odds are the score's signed distance, which any tilt
    # scales; a locked token's are L
    nll: dict[str, dict[Setting, float]] = {}
    per_req: dict[Setting, np.ndarray] = {}
    for m in margins:
        rows: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for s in real:
            gate = wrap(folds.get(s.source, full), f"{a.base}+mix-{m:g}-tilt-1")
            roles, mixed, lo, locked = rollout_weights(gate, s, tt)
            rows.append((s, roles, mixed, lo, locked))
        for b in tilts:
            for lk in locks:
                v = np.array([role_stats(r, s.lp, len(s.prompt_ids), None,
                                         mx | (locked & (lk > 0)),
                                         np.where(locked, lk, b * lo))[0]
                              for s, r, mx, lo, locked in rows])
                per_req[m, b, lk] = v
                for s, x in zip(real, v, strict=True):
                    nll.setdefault(s.source, {}).setdefault((m, b, lk), 0.0)
                    nll[s.source][m, b, lk] += float(x)
    picks = nested_choice(nll, held)
    n = np.array([len(s) for s in real], dtype=np.float64)
    nested = np.array([per_req[picks[s.source]][i] for i, s in enumerate(real)])
    lt = np.array([-float(s.lp[0].sum()) for s in real])
    mix = np.array([-float(mixture_lp(s.lp).sum()) for s in real])

    print(f"\nreal suite: {len(real)} requests, {int(n.sum())} answer tokens; gate "
          f"learned-loso{a.base}+mix-M-tilt-B-lock-L; pooled nats/token")
    print("| M, L \\ B | " + " | ".join(f"{b:g}" for b in tilts) + " |")
    print("|---|" + "---|" * len(tilts))
    for m in margins:
        for lk in locks:
            print(f"| {m:g}, {lk:g} | " + " | ".join(
                f"{per_req[m, b, lk].sum() / n.sum():.4f}" for b in tilts) + " |")
    print("\nnested picks (M, B, L) per source (chosen on the other sources):")
    for src in sorted(picks):
        print(f"  {src}: M {picks[src][0]:g}, B {picks[src][1]:g}, L {picks[src][2]:g}")
    W = cluster_weights(len(real), a.bootstrap, 0) if a.bootstrap else None  # requests

    def gain(ref: np.ndarray) -> str:
        point = float((ref.sum() - nested.sum()) / n.sum())
        return fmt(_ci(point, None if W is None else (W @ (ref - nested)) / (W @ n)), True)

    print(f"\nnested policy: {nested.sum() / n.sum():.4f} nats/token; always-transformer "
          f"{lt.sum() / n.sum():.4f}, the 50/50 mixture {mix.sum() / n.sum():.4f}")
    print(f"gain over always-transformer {gain(lt)}; over the mixture {gain(mix)} "
          "(> 0: better; paired 95% CI)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
