"""``archroute eval``: benchmark routing policies, quality against cost.

    archroute eval                                   # built-in suites, all policies, reference pair
    archroute eval --suites corpus my.jsonl --policies rules classifier oracle --out eval-out
    archroute eval --suites routerbench:table.pkl --cost usd
    archroute eval --suites real --real-per-source 5  # real requests ($ARCHROUTE_REQUESTS)
    archroute eval --report-only eval-out            # re-render a saved results.json
    archroute eval --from-log archroute-decisions.sqlite --policy classifier --threshold 0.6
                                                     # off-policy, from the router's own log
    archroute eval --simulate-shift --sources mbpp --limit 400
                                                     # the learning loop on a new source

Writes ``results.json`` (typed, with provenance), ``requests.jsonl`` (per-request table),
``report.md``, ``report.html`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("archroute.eval")


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="benchmark routing policies: quality vs cost",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="settings file (JSON or YAML); the CLI overrides it")
    p.add_argument("--suites", nargs="+", help="built-in names (humaneval, corpus, real), .jsonl "
                   "suites, or routerbench:TABLE (default: humaneval corpus)")
    p.add_argument("--policies", nargs="+", help="policy names (default: every registered one + oracle)")
    p.add_argument("--out", help="output directory (default: eval-out)")
    p.add_argument("--transformer", help="transformer backend spec (default: reference:transformer)")
    p.add_argument("--hybrid", help="hybrid backend spec (default: reference:hybrid)")
    p.add_argument("--cost", choices=["flops", "memory_bytes", "wall_ms", "usd"], help="cost axis")
    p.add_argument("--price", action="append", default=[], metavar="ROLE=USD_PER_1M",
                   help="price per 1M tokens, e.g. --price transformer=0.2 --price hybrid=0.1")
    p.add_argument("--threshold", type=float, help="operating threshold for every policy "
                   "(default: each policy's own default threshold; 0.5 for most, the classifier's "
                   "is the one its artifact chose on validation data)")
    p.add_argument("--limit", type=int, help="first N requests of each suite")
    p.add_argument("--real-per-source", type=int, help="requests per request file in the real "
                   "suite (default 40; the folder: $ARCHROUTE_REQUESTS or the shared data folder)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples (default 1000; 0 = none)")
    p.add_argument("--seed", type=int)
    p.add_argument("--generate", action="store_true", default=None,
                   help="also generate and apply task metrics (slow; runs model-written code "
                        "for code_test requests)")
    p.add_argument("--cache-dir", help="per-request result cache (default ~/.cache/archroute/eval)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false", default=None)
    p.add_argument("--threads", dest="torch_threads", type=int, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--write-suites", metavar="DIR", help="write the suites as JSONL and exit")
    p.add_argument("--report-only", metavar="DIR", help="re-render DIR/results.json and exit")
    g = p.add_argument_group("off-policy evaluation from a decision log (docs/learning-loop.md)")
    g.add_argument("--from-log", metavar="DB", help="the router's decision log (SQLite path or "
                   "postgresql:// URL): estimate --policy at --threshold from its logged "
                   "decisions, propensities and rewards (IPS, SNIPS, DR); needs log_prompts")
    g.add_argument("--policy", default="classifier", help="with --from-log: the target policy "
                   "(default classifier)")
    g.add_argument("--profile", help="with --from-log: only requests routed by this profile")
    g.add_argument("--reward", choices=("auto", "feedback", "loss"), default="auto",
                   help="with --from-log: the clients' feedback, or minus the chosen "
                        "backend's loss on a scored reference (auto: feedback when there is any)")
    g.add_argument("--artifact", metavar="DIR", help="with --from-log: the classifier artifact "
                   "for the target policy and DR's direct model (default: the shipped one)")
    g.add_argument("--json", dest="json_out", metavar="FILE",
                   help="with --from-log: also write the estimates as JSON")
    h = p.add_argument_group("shift simulation: does the learning loop learn a new source "
                             "safely? (docs/learning-loop.md)")
    h.add_argument("--simulate-shift", action="store_true",
                   help="train on all sources but one, stream that one through the learning "
                        "loop (exploration, references, guard, gate, refit); every source in turn")
    h.add_argument("--labels", default="data/labels/real.jsonl",
                   help="with --simulate-shift: the label file (default data/labels/real.jsonl)")
    h.add_argument("--sources", nargs="+", help="with --simulate-shift: only these sources as "
                   "the new one (default: every source); --limit N keeps N labels per source")
    h.add_argument("--epsilon", type=float, default=0.1,
                   help="with --simulate-shift: exploration share (0 to 0.5, default 0.1)")
    h.add_argument("--retrain-every", type=int, default=50,
                   help="with --simulate-shift: a loop step every N labels (default 50)")
    h.add_argument("--refit", choices=("warm", "scratch", "base"), default="warm",
                   help="with --simulate-shift: candidates warm-started from the base model "
                        "(default), fitted from nothing, or the base with a fresh guard only")
    h.add_argument("--gate-level", type=float, default=None,
                   help="with --simulate-shift: the two-sided level of the gate's bootstrap CI "
                        "(default 0.95; 0.90 is a one-sided 95%% test)")
    p.set_defaults(func=run)


def _prices(items: list[str]) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for it in items:
        role, _, val = it.partition("=")
        try:
            out[role.strip()] = float(val)
        except ValueError:
            raise SystemExit(f"--price {it!r}: expected ROLE=NUMBER") from None
    return out


def run(a: argparse.Namespace) -> int:
    from evals.harness.config import EvalConfig
    from evals.harness.report import write_report
    from evals.harness.results import EvalResult

    if a.from_log:
        from evals.from_log import run as run_from_log

        return run_from_log(a.from_log, a.policy, a.threshold, a.profile, a.reward, a.artifact,
                            n_boot=1000 if a.bootstrap is None else a.bootstrap,
                            seed=a.seed or 0, json_out=a.json_out)
    if a.simulate_shift:
        from evals.shift import run as run_shift

        return run_shift(a.labels, a.out, a.sources, a.limit, a.epsilon, a.retrain_every,
                         a.refit, a.seed or 0, 300 if a.bootstrap is None else a.bootstrap,
                         progress=not a.no_progress, gate_level=a.gate_level)
    if a.report_only:
        res = EvalResult.load(Path(a.report_only) / "results.json")
        paths = write_report(res, a.report_only)
        print(json.dumps(paths, indent=1))
        return 0
    try:
        cfg = EvalConfig.from_sources(
            a.config, suites=a.suites, policies=a.policies, out=a.out, transformer=a.transformer,
            hybrid=a.hybrid, cost=a.cost, prices=_prices(a.price), threshold=a.threshold,
            limit=a.limit, real_per_source=a.real_per_source, bootstrap=a.bootstrap, seed=a.seed,
            generate=a.generate, cache_dir=a.cache_dir, use_cache=a.use_cache,
            torch_threads=a.torch_threads)
    except (ValueError, OSError) as exc:
        print(f"archroute eval: {exc}", file=sys.stderr)
        return 2
    log.info("eval settings: %s", json.dumps(cfg.to_dict(), sort_keys=True))
    if a.write_suites:
        from evals.harness.evaluate import load_suite
        from evals.harness.suites import SuiteError, write_jsonl

        Path(a.write_suites).mkdir(parents=True, exist_ok=True)
        for spec in cfg.suites:
            try:
                suite, _ = load_suite(spec, cfg)
            except SuiteError as exc:
                print(f"archroute eval: {exc}", file=sys.stderr)
                return 2
            write_jsonl(suite, Path(a.write_suites) / f"{suite.name}.jsonl")
            print(f"{suite.name}: {len(suite)} requests, hash {suite.content_hash}")
        return 0
    from evals.harness.evaluate import run_eval
    from evals.harness.suites import SuiteError

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = run_eval(cfg, progress=not a.no_progress, argv=sys.argv,
                          write_requests=out / "requests.jsonl")
    except (SuiteError, FileNotFoundError, ValueError) as exc:
        print(f"archroute eval: {exc}", file=sys.stderr)
        return 2
    result.save(out / "results.json")
    paths = write_report(result, out)
    s = result.singles
    print(f"{sum(x.n_scored for x in result.suites)} requests, cost axis {result.cost_axis}, "
          f"{result.provenance.duration_s:.1f} s")
    print(f"quality  transformer {s['transformer']['quality']:.4f}  hybrid {s['hybrid']['quality']:.4f}"
          f"  oracle {s['oracle']['quality']:.4f}")
    for p in result.policies:
        g = p.metrics["gap_recovered"]
        print(f"  {p.name:<22} threshold {p.threshold:.3f}  gap recovered {g[0] if g[0] is not None else float('nan'):7.3f}"
              f"  share T {p.metrics['share_transformer'][0]:.2f}")
    print(f"report: {paths['markdown']} and {paths['html']}")
    return 0
