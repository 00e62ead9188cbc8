"""Decision latency of the request classifier by prompt length (``archroute bench classifier``).

One request at a time, as the router sees them: features + model for the LightGBM router
(the shipped artifact), embedding + logistic regression for the MiniLM baseline. Prompts
are corpus text (code, prose and markup interleaved) cut to ``tokens * chars_per_token``
characters (4 characters per token, about what a cl100k-style tokenizer gives on mixed
text). Prints p50 / p99 in milliseconds; figures, not a test.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

DEFAULT_LENGTHS = "512,2048,8192,32768"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="prompt lengths in tokens")
    p.add_argument("--chars-per-token", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=300, help="timed decisions per length")
    p.add_argument("--embed-repeats", type=int, default=50, help="timed decisions (embedding)")
    p.add_argument("--artifact", default=None, help="artifact dir (default: the shipped one)")
    p.add_argument("--corpus", default="data/corpus", help="text source (synthetic if missing)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the embedding")
    p.add_argument("--no-embedding", action="store_true", help="skip the embedding baseline")


def bench_text(n_chars: int, corpus: str) -> str:
    """``n_chars`` of corpus text, domains interleaved in 2 KB pieces (synthetic fallback)."""
    from pathlib import Path

    pieces: list[str] = []
    path = Path(corpus) / "train.jsonl" if Path(corpus).is_dir() else Path(corpus)
    if path.exists():
        import json

        by_domain: dict[str, list[str]] = {}
        with path.open() as f:
            for line in f:
                d = json.loads(line)
                by_domain.setdefault(d["domain"], []).append(d["text"])
        streams = ["\n".join(v) for _, v in sorted(by_domain.items())]
        i = 0
        while sum(map(len, pieces)) < n_chars:
            s = streams[len(pieces) % len(streams)]
            pieces.append(s[i:i + 2048])
            if len(pieces) % len(streams) == 0:
                i += 2048
    else:
        words = "the river stone light def f(x): return [x, {y}] <p>text</p> quietly".split()
        rng = np.random.default_rng(0)
        pieces = [" ".join(rng.choice(words, size=n_chars // 4))]
    return "".join(pieces)[:n_chars]


def _time(fn, repeats: int, warmup: int = 5) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    ts = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts[i] = time.perf_counter() - t0
    return float(np.percentile(ts, 50) * 1e3), float(np.percentile(ts, 99) * 1e3)


def run(args: argparse.Namespace) -> int:
    from classifiers import artifact
    from classifiers.features import extract
    from classifiers.request import RoutingRequest

    clf = artifact.load(args.artifact) if args.artifact else artifact.load_default()
    emb = None
    if not args.no_embedding:
        try:
            import torch

            from classifiers.training.estimators import EmbeddingRouter

            torch.set_num_threads(args.threads)
            rng = np.random.default_rng(0)  # weights do not change the cost: fit on noise
            emb = EmbeddingRouter().fit(None, rng.integers(0, 2, 64),
                                        embeddings=rng.normal(size=(64, 384)))
            emb.predict_proba(["warm up"])
        except ImportError as exc:
            print(f"embedding baseline skipped: {exc}")
            emb = None
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for n in lengths:
        text = bench_text(int(n * args.chars_per_token), args.corpus)
        req = RoutingRequest.from_prompt(text)
        reps = max(20, args.repeats if n <= 8192 else args.repeats // 4)
        lgb = _time(lambda r=req: clf.predict_proba([r]), reps)
        feat = _time(lambda r=req: extract(r), reps)
        e = (_time(lambda r=req: emb.predict_proba([r]), args.embed_repeats, warmup=2)
             if emb is not None else (float("nan"), float("nan")))
        rows.append((n, len(text), *lgb, feat[0], *e))
    from classifiers.features import FEATURE_NAMES

    # classifier: the shipped decision end to end (the features it uses, its model, the
    # calibration); all features: the full extraction, for comparison
    print(f"| prompt tokens | chars | classifier p50 ms | classifier p99 ms | all "
          f"{len(FEATURE_NAMES)} features p50 ms | embedding p50 ms | embedding p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, c, l50, l99, f50, e50, e99 in rows:
        print(f"| {n} | {c} | {l50:.3f} | {l99:.3f} | {f50:.3f} | {e50:.2f} | {e99:.2f} |")
    return 0
