"""``archroute analyze``: the study's token-level method on any transformer/hybrid pair.

    archroute analyze                                   # reference pair, data/corpus val split
    archroute analyze --transformer http://gpu:8000/v1#allenai/Olmo-3-1025-7B \\
                      --hybrid http://gpu:8001/v1#allenai/Olmo-Hybrid-7B --corpus my.jsonl

Writes to ``--out``: ``tokens.parquet`` (per-token table), ``summary.json``, ``report.md``
and PNG plots; scores are cached under ``--out/cache`` (or ``--cache``) so a rerun or an
interrupted run does not recompute.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

from models.provenance import git_commit
from models.registry import REFERENCE_SPECS

log = logging.getLogger(__name__)

# every default of the command, in one place
DEFAULTS = {
    "corpus": "data/corpus",  # a JSONL file, or a directory (with {split}.jsonl, or files)
    "split": "val",
    "transformer": REFERENCE_SPECS["transformer"],
    "hybrid": REFERENCE_SPECS["hybrid"],
    "window": 512,  # tokens the model sees per window (start token included)
    "max_tokens": None,  # cap on scored tokens, taken round-robin over domains
    "batch_size": 8,  # windows per forward pass (and per cache file)
    "out": "runs/analysis",
    "bootstrap": 1000,  # cluster-bootstrap replicates (clusters = windows)
    "seed": 0,
    "threads": None,  # torch CPU threads for in-process backends
    "device": None,  # in-process backends: cpu / cuda (default: cuda when available)
}


def add_analyze(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="token-level loss gap analysis of a backend pair",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=DEFAULTS["corpus"], help="JSONL file or directory")
    p.add_argument("--split", default=DEFAULTS["split"], help="split file in a corpus directory")
    p.add_argument("--transformer", default=DEFAULTS["transformer"], metavar="SPEC",
                   help="reference:transformer | model dir | http(s)://host/v1#model")
    p.add_argument("--hybrid", default=DEFAULTS["hybrid"], metavar="SPEC", help="as --transformer")
    p.add_argument("--window", type=int, default=DEFAULTS["window"], help="tokens per window")
    p.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"],
                   help="score at most N tokens (round-robin over domains)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--out", default=DEFAULTS["out"], help="output directory")
    p.add_argument("--cache", default=None, help="score cache directory (default OUT/cache)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument("--bootstrap", type=int, default=DEFAULTS["bootstrap"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    p.add_argument("--device", default=DEFAULTS["device"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def load_backend(spec: str, threads: int | None, device: str | None):
    """A backend from its spec (models/registry.py)."""
    from models.registry import from_spec

    return from_spec(spec, torch_threads=threads, **({"device": device} if device else {}))


def analyze(docs, transformer, hybrid, out: Path, *, specs: tuple[str, str], window: int,
            max_tokens: int | None = None, batch_size: int = 8, cache: Path | None = None,
            n_boot: int = 1000, seed: int = 0, progress: bool = True,
            meta: dict | None = None) -> dict:
    """Score, tabulate, summarise and report; returns the summary (also in summary.json)."""
    from evals.analysis import report
    from evals.analysis.scoring import score_pair
    from evals.analysis.summary import summarize
    from evals.analysis.table import build_table

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scored = score_pair(docs, transformer, hybrid, specs=specs, window=window,
                        max_tokens=max_tokens, batch_size=batch_size, cache_root=cache,
                        progress=progress)
    t_score = time.perf_counter() - t0
    df = build_table(docs, scored)
    df.to_parquet(out / "tokens.parquet", index=False)
    t_table = time.perf_counter() - t0 - t_score
    summary = summarize(df, n_boot=n_boot, seed=seed)
    t_total = time.perf_counter() - t0
    summary["meta"] = {
        **(meta or {}), "transformer": specs[0], "hybrid": specs[1], "window": window,
        "max_tokens": max_tokens, "batch_size": batch_size,
        "backends": {k: b.info().__dict__ for k, b in (("transformer", transformer),
                                                        ("hybrid", hybrid))},
        "seconds": {"scoring": round(t_score, 1), "table": round(t_table, 1),
                    "total": round(t_total, 1)},
        "git": git_commit(), "python": platform.python_version(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    report.plots(summary, out)
    (out / "report.md").write_text(report.markdown(summary, summary["meta"]))
    log.info("analysed %d tokens in %.1f s (scoring %.1f s) -> %s", len(df), t_total, t_score, out)
    return summary


def run(args: argparse.Namespace) -> int:
    from evals.analysis.corpus import load_corpus

    out = Path(args.out)
    docs = load_corpus(args.corpus, args.split)
    log.info("corpus %s: %d documents", args.corpus, len(docs))
    transformer = load_backend(args.transformer, args.threads, args.device)
    hybrid = load_backend(args.hybrid, args.threads, args.device)
    cache = None if args.no_cache else Path(args.cache) if args.cache else out / "cache"
    meta = {"command": " ".join(["archroute", *sys.argv[1:]]), "corpus": args.corpus,
            "split": args.split}
    s = analyze(docs, transformer, hybrid, out, specs=(args.transformer, args.hybrid),
                window=args.window, max_tokens=args.max_tokens, batch_size=args.batch_size,
                cache=cache, n_boot=args.bootstrap, seed=args.seed,
                progress=not args.no_progress, meta=meta)
    o = s["pooled"]["overall"]
    print(f"{s['n_tokens']} tokens: loss_t {o['loss_t']:.3f}, loss_h {o['loss_h']:.3f}, "
          f"gap {o['mean']:+.3f} [{o['lo']:+.3f}, {o['hi']:+.3f}]; report: {out / 'report.md'}")
    return 0
