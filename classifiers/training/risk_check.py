"""``python -m classifiers.training.risk_check``: the tables of docs/classifier.md, "Thresholds with a
guarantee", checked on held-out data (a research command; the thresholds themselves are
:mod:`classifiers.training.risk`, which the training code imports)."""

from __future__ import annotations

import numpy as np

from classifiers.training.risk import RISK_ALPHAS, RISK_DELTA, by_source, validate


def main(argv: list[str] | None = None) -> int:
    """``python -m classifiers.training.risk``: the tables of docs/classifier.md, "Thresholds with a
    guarantee", from leave-one-source-out predictions of the shipped model variant."""
    import argparse

    from classifiers.features import extract
    from classifiers.training.labels import require_labels
    from classifiers.training.realdata import EVAL_ONLY
    from classifiers.training.train_router import (
        SHIPPED,
        label_arrays,
        leave_one_source_out,
        make_router,
        routing_request,
    )

    ap = argparse.ArgumentParser(prog="python -m classifiers.training.risk_check", description=main.__doc__)
    ap.add_argument("--labels", default="data/labels/real.jsonl")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--n-cal", type=int, default=2000)
    a = ap.parse_args(argv)
    rows = sorted((r for r in require_labels(a.labels, latest_only=True) if r["gap"] == r["gap"]),
                  key=lambda r: (r["group"], r["id"]))
    reqs = [routing_request(r) for r in rows]
    X = np.stack([extract(q) for q in reqs])
    res = leave_one_source_out(X, reqs, rows, make_model=lambda: make_router(SHIPPED, 0))
    p = np.array(res["p"])
    _, lt, lh, groups, _ = label_arrays(rows)
    pool = ~np.isin(groups, list(EVAL_ONLY))
    print(f"Random calibration draws of {a.n_cal} requests from the {int(pool.sum())} trainable "
          f"rows, judged on the rest, {a.reps} repetitions (leave-one-source-out scores):\n")
    print("| method | alpha | delta | mean threshold | realised risk, mean | 90th pct | "
          "repetitions above alpha | share to hybrid |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in validate(p[pool], lt[pool], lh[pool], reps=a.reps, n_cal=a.n_cal):
        d = "-" if r.method == "mean" else f"{r.delta:g}"
        print(f"| {r.method} | {r.alpha:g} | {d} | {r.mean_threshold:.3f} | {r.mean_risk:.3f} | "
              f"{r.p90_risk:.3f} | {r.exceed_share:.1%} | {r.hybrid_share:.1%} |")
    print("\nCalibrated on every other source, violation rate on the held-out one "
          "(share to the hybrid):\n")
    srcs = sorted(set(groups))
    print("| alpha | " + " | ".join(srcs) + " |")
    print("| ---: | " + " | ".join("---:" for _ in srcs) + " |")
    for alpha in RISK_ALPHAS:
        bs = by_source(p, lt, lh, groups, alpha, RISK_DELTA, tuple(EVAL_ONLY))
        print(f"| {alpha:g} | " + " | ".join(f"{bs[s][0]:.3f} ({bs[s][1]:.0%})" for s in srcs)
              + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
