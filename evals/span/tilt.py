"""Choosing a mixing gate's margin and tilt without looking at the source it is judged on.

    python -m evals.span.tilt --per-source 100 --train-functions 200 --loso-dir runs/span-tilt/loso

A mixing gate (``learned+copy-8-prompt-2+mix-M-tilt-B``, :class:`models.span.gates.MixGate`)
has two settings: the margin M (mix where the gate's score is within M nats of its boundary)
and the tilt B (the transformer's weight there is ``sigmoid(B * s)``, ``s`` the score's
signed distance from the boundary; 0 = the 50/50 mixture). This picks them the way
span-eval's ``learned-loso`` picks the gate: for each source of the real suite, the gate
trained without it (the same folds, :func:`evals.span.train.loso_gates`; saved to and
reused from ``--loso-dir``), wrapped with each (M, B), rolled out on that source's requests
(teacher-forced, span-eval's cached per-token scores). The **nested** choice for a source is
the (M, B) of least pooled loss on the *other* sources; its loss on the source itself is the
held-out figure. Requests of evaluation-only files are judged by the gate trained on every
source, with the (M, B) of least loss on all training sources.

Printed: the grid (every (M, B) pooled over the real suite: held out by source for the gate,
in hindsight for M and B), the nested picks per source, and the nested policy's pooled loss
against always-transformer and the 50/50 mixture (paired 95% bootstrap CIs over requests).
Figures, not a test.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

MARGINS = (1.0, 2.0)
TILTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)

Setting = tuple[float, float]  # (margin M, tilt B)


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
    p.add_argument("--loso-dir", type=Path, default=Path("runs/span-tilt/loso"),
                   help="the leave-one-source-out gates: loaded when all are there, else "
                        "trained (about 10 minutes) and saved")
    p.add_argument("--bootstrap", type=int, default=1000)
    a = p.parse_args(argv)

    from evals.analysis.stats import cluster_weights
    from evals.span.evaluate import _ci, role_stats, rollout_weights
    from evals.span.run import SpanConfig, load_pair, load_suites, training_seqs
    from evals.span.score import score_suite, token_texts
    from evals.span.train import loso_gates, train_gate
    from models.span.gates import wrap
    from models.span.learned import load_learned_gate

    margins = [float(x) for x in a.margins.split(",")]
    tilts = [float(x) for x in a.tilts.split(",")]
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

    # one roll-out per margin: the mixing decisions do not depend on the tilt, and at tilt 1
    # the weight's log-odds are the score's signed distance, which any tilt scales
    nll: dict[str, dict[Setting, float]] = {}
    per_req: dict[Setting, np.ndarray] = {}
    for m in margins:
        rows = []
        for s in real:
            gate = wrap(folds.get(s.source, full), f"{a.base}+mix-{m:g}-tilt-1")
            roles, mixed, lo = rollout_weights(gate, s, tt)
            rows.append((s, roles, mixed, lo))
        for b in tilts:
            v = np.array([role_stats(r, s.lp, len(s.prompt_ids), None, mx, b * lo)[0]
                          for s, r, mx, lo in rows])
            per_req[m, b] = v
            for s, x in zip(real, v, strict=True):
                nll.setdefault(s.source, {}).setdefault((m, b), 0.0)
                nll[s.source][m, b] += float(x)
    picks = nested_choice(nll, held)
    n = np.array([len(s) for s in real], dtype=np.float64)
    nested = np.array([per_req[picks[s.source]][i] for i, s in enumerate(real)])
    lt = np.array([-float(s.lp[0].sum()) for s in real])
    mix = np.array([-float((np.logaddexp(s.lp[0], s.lp[1]) - np.log(2.0)).sum()) for s in real])

    print(f"\nreal suite: {len(real)} requests, {int(n.sum())} answer tokens; gate "
          f"learned-loso{a.base}+mix-M-tilt-B; pooled nats/token")
    print("| M \\ B | " + " | ".join(f"{b:g}" for b in tilts) + " |")
    print("|---|" + "---|" * len(tilts))
    for m in margins:
        print(f"| {m:g} | " + " | ".join(f"{per_req[m, b].sum() / n.sum():.4f}" for b in tilts)
              + " |")
    print("\nnested picks (M, B) per source (chosen on the other sources):")
    for src in sorted(picks):
        print(f"  {src}: M {picks[src][0]:g}, B {picks[src][1]:g}")
    W = cluster_weights(len(real), a.bootstrap, 0) if a.bootstrap else None  # requests

    def gain(ref: np.ndarray) -> str:
        point = float((ref.sum() - nested.sum()) / n.sum())
        return _fmt(_ci(point, None if W is None else (W @ (ref - nested)) / (W @ n)))

    print(f"\nnested policy: {nested.sum() / n.sum():.4f} nats/token; always-transformer "
          f"{lt.sum() / n.sum():.4f}, the 50/50 mixture {mix.sum() / n.sum():.4f}")
    print(f"gain over always-transformer {gain(lt)}; over the mixture {gain(mix)} "
          "(> 0: better; paired 95% CI)")
    return 0


def _fmt(ci: list) -> str:
    v, lo, hi = ci
    return f"{v:+.4f}" + (f" [{lo:+.4f}, {hi:+.4f}]" if lo is not None else "")


if __name__ == "__main__":
    raise SystemExit(main())
