"""``archroute span-eval``: teacher-forced span routing, every gate against the baselines.

    archroute span-eval                                  # humaneval + corpus, every gate
    archroute span-eval --suites real --per-source 100   # real requests, 100 per source file
    archroute span-eval --gates copy-2 learned learned-loso --out runs/span-eval
    archroute span-eval --train-gate models/span/default_gate --per-source 100
    archroute span-eval --train-gate runs/gate --train-corpus none   # real requests only
    archroute span-eval --report-only runs/span-eval     # re-render a saved results.json

Writes ``results.json``, ``report.md`` and PNG plots to ``--out``. Per-token scores are
cached (``--cache-dir``, default ~/.cache/archroute/span), so a rerun only rolls out gates.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("archroute.span")


def add_span_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("span-eval", help="teacher-forced span routing evaluation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", help="built-in names (humaneval, corpus, real) or "
                   ".jsonl suites (default: humaneval corpus)")
    p.add_argument("--per-source", type=int, help="requests per request file in the real suite "
                   "(default 40); also the learned gate's training sample")
    p.add_argument("--gates", nargs="+", help="gate names (default: every registered gate and "
                   "learned-loso); learned:PATH loads another artifact")
    p.add_argument("--out", help="output directory (default runs/span-eval)")
    p.add_argument("--train-gate", metavar="OUT", help="train the learned gate on every trainable "
                   "source of the real suite, save it to OUT (a folder or .json) and exit")
    p.add_argument("--train-corpus", metavar="PATH", help="the learned gate (--train-gate, "
                   "learned-loso) also trains on requests cut from this corpus file by the corpus "
                   "suite's generator (default data/corpus/train.jsonl, the reference corpus's "
                   "train split; 'none' = the real requests only; a held-out file is refused)")
    p.add_argument("--train-corpus-per-domain", type=int, metavar="N",
                   help="requests cut per corpus domain for training (default 120)")
    p.add_argument("--train-functions", type=int, metavar="N",
                   help="the learned gate also trains on N function-completion requests cut from "
                        "the corpus train split's code (default 0)")
    p.add_argument("--transformer", help="transformer backend spec (default reference:transformer)")
    p.add_argument("--hybrid", help="hybrid backend spec (default reference:hybrid)")
    p.add_argument("--limit", type=int, help="first N requests of each suite")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples (default 1000; 0 = none)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", dest="torch_threads", type=int, help="torch threads (default 1)")
    p.add_argument("--batch-size", type=int, help="sequences per forward pass (default 8)")
    p.add_argument("--cache-dir", help="per-token score cache (default ~/.cache/archroute/span)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false", default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report-only", metavar="DIR", help="re-render DIR/results.json and exit")
    p.set_defaults(func=run)


def _config(a: argparse.Namespace):
    from evals.span.run import SpanConfig

    given = {k: getattr(a, k) for k in ("suites", "gates", "per_source", "out", "transformer",
                                        "hybrid", "limit", "bootstrap", "seed", "torch_threads",
                                        "batch_size", "cache_dir", "use_cache",
                                        "train_corpus", "train_corpus_per_domain",
                                        "train_functions")}
    if given["train_corpus"] is not None and given["train_corpus"].lower() == "none":
        given["train_corpus"] = ""
    cfg = SpanConfig(**{k: v for k, v in given.items() if v is not None})
    if cfg.train_corpus_per_domain < 1:
        raise ValueError(f"--train-corpus-per-domain must be >= 1, got {cfg.train_corpus_per_domain}")
    if cfg.train_functions < 0:
        raise ValueError(f"--train-functions must be >= 0, got {cfg.train_functions}")
    if cfg.per_source < 1:
        raise ValueError(f"--per-source must be >= 1, got {cfg.per_source}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {cfg.limit}")
    return cfg


def run(a: argparse.Namespace) -> int:
    from evals.span.report import write_report
    from evals.span.run import SpanEvalError, check_gates, run_span_eval, train_default

    def fail(msg: object) -> int:
        print(f"archroute span-eval: {msg}", file=sys.stderr)
        return 2

    if a.report_only:
        path = Path(a.report_only) / "results.json"
        if not path.is_file():
            return fail(f"{path}: no results to render")
        results = json.loads(path.read_text())
        print(json.dumps(write_report(results, a.report_only), indent=1))
        return 0
    try:
        cfg = _config(a)
        if cfg.gates:
            check_gates(cfg.gates)
    except (ValueError, TypeError) as exc:
        return fail(exc)
    log.info("span-eval settings: %s", json.dumps(cfg.to_dict(), sort_keys=True))
    print("archroute span-eval: the default suites take about 6-7 minutes on 2 cores "
          "(scoring every request with both models; cached scores make a rerun faster); "
          "progress below", file=sys.stderr)
    if a.train_gate:
        try:
            path, gate = train_default(cfg, a.train_gate, progress=not a.no_progress, argv=sys.argv)
        except (SpanEvalError, FileNotFoundError) as exc:
            return fail(exc)
        print(f"learned gate: {path} (threshold {gate.threshold:+.3f}, "
              f"{gate.meta['requests']} requests, {gate.meta['tokens']} tokens, "
              f"{len(gate.meta['sources'])} sources)")
        return 0
    try:
        results = run_span_eval(cfg, progress=not a.no_progress, argv=sys.argv)
    except (SpanEvalError, FileNotFoundError) as exc:
        return fail(exc)
    paths = write_report(results, cfg.out)
    for name, res in results["suites"].items():
        p = res["policies"]
        best = res["bar"].get("best_gate")
        print(f"{name}: {res['requests']} requests, {res['tokens']} tokens; loss T "
              f"{p['always-transformer']['loss'][0]:.3f} H {p['always-hybrid']['loss'][0]:.3f} "
              f"request oracle {p['request-oracle']['loss'][0]:.3f}"
              + (f"; best gate {best} {p[best]['loss'][0]:.3f}" if best else ""))
    print(f"report: {paths['markdown']}")
    return 0
