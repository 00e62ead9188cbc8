"""Model selection for the learned gate on training sources only (no evaluation suite).

Leave-one-source-out over every training source of the gate (each real file, each
corpus-train domain, the function-completion requests): for each source, a gate trained on
all the others routes it; per source and pooled (real folds, corpus-train folds), the gain
against copy-1, copy-2 and the request-level oracle with paired 95% CIs, and against the
source's best copy-k in hindsight. ``--split-functions`` splits the function-completion
requests by document into two sources, so each half is judged by a gate that has seen
function completion from other documents.

    python -m evals.span.select --per-source 100                       # version 2's data
    python -m evals.span.select --per-source 100 --train-functions 200 --split-functions

About 9-11 minutes on 2 cores from cached scores (``archroute span-eval`` fills the cache).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence

import numpy as np


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.span.select", description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-source", type=int, default=100, help="real requests per file (default 100)")
    ap.add_argument("--train-corpus-per-domain", type=int, default=120)
    ap.add_argument("--train-functions", type=int, default=0)
    ap.add_argument("--split-functions", action="store_true",
                    help="the function-completion requests as two sources, split by document")
    ap.add_argument("--bootstrap", type=int, default=200)
    a = ap.parse_args(argv)

    from evals.span import train as T
    from evals.span.evaluate import REF, baseline_stats, compare, gate_stats
    from evals.span.run import TRAIN_FUNCTIONS, SpanConfig, load_pair, training_seqs
    from evals.span.score import token_texts
    from models.span.gates import CopyGate

    cfg = SpanConfig(per_source=a.per_source, train_corpus_per_domain=a.train_corpus_per_domain,
                     train_functions=a.train_functions)
    pair = load_pair(cfg)
    text = token_texts(pair[0])
    train, _ = training_seqs(cfg, pair, False)
    if a.split_functions:
        for s in train:
            if s.source == TRAIN_FUNCTIONS:
                doc = s.id.split(":", 1)[1]
                half = int(hashlib.sha1(doc.encode()).hexdigest(), 16) % 2
                s.source = f"{TRAIN_FUNCTIONS}:{'ab'[half]}"
    folds = T.loso_gates(train, text)
    copies = {f"copy-{k}": CopyGate(k) for k in (1, 2, 3, 4)}
    st = baseline_stats(train)
    st.update(gate_stats({"loso": lambda s: folds[s.source], **copies}, train, text))
    src = np.array([s.source for s in train]).astype(str)

    def line(name: str, idx: np.ndarray) -> str:
        sub = {k: v.take(idx) for k, v in st.items()}
        loss = {k: float(v.nll.sum() / v.n.sum()) for k, v in sub.items()}
        best = min(copies, key=loss.__getitem__)
        out = [f"{name} ({len(idx)} requests)"]
        for b in ("copy-1", "copy-2", REF):
            d = compare(sub, "loso", b, a.bootstrap, 0)
            out.append(f"vs {b} {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]")
        out.append(f"vs best copy-k ({best}) {loss[best] - loss['loso']:+.4f}")
        return " | ".join(out)

    corpus = np.char.startswith(src, "corpus-train")
    print(line("real folds", np.flatnonzero(~corpus)))
    print(line("corpus-train folds", np.flatnonzero(corpus)))
    for s_ in sorted(set(src)):
        print("  " + line(s_, np.flatnonzero(src == s_)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
