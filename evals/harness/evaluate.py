"""Run an eval: suites x backends (cached) -> one table -> every policy's sweep and metrics.

>>> result = run_eval(EvalConfig(suites=["corpus"], limit=20))      # doctest: +SKIP
>>> result.policy("rules").metrics["gap_recovered"]                  # [value, lo, hi]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from evals.harness import metrics as M
from evals.harness.builtin import BUILTINS, REAL_SEED, MissingDependencyError, load_builtin
from evals.harness.builtin import SEED as CORPUS_SEED
from evals.harness.config import EvalConfig
from evals.harness.results import (
    BackendSummary,
    EvalResult,
    PolicyResult,
    SuiteSummary,
    finite,
    make_provenance,
)
from evals.harness.suites import Suite, SuiteError, load_jsonl
from evals.harness.table import PairTable, load_routerbench, table_from_records

if TYPE_CHECKING:
    from router.policies import Policy

log = logging.getLogger(__name__)
ORACLE = "oracle"
TABLE_SUFFIXES = (".csv", ".parquet", ".pkl", ".pickle")


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def load_suite(spec: str, cfg: EvalConfig) -> tuple[Suite, PairTable | None]:
    """A built-in name, a JSONL suite file, or a RouterBench-style table (``.csv``,
    ``.parquet``, ``.pkl``, or ``routerbench:PATH``), which brings its own table."""
    if spec in BUILTINS:
        suite = load_builtin(spec, cfg.corpus, cfg.corpus_per_domain, cfg.humaneval_n,
                             cfg.real_per_source)
        return suite.head(cfg.limit), None
    if spec.startswith("routerbench:") or spec.endswith(TABLE_SUFFIXES):
        suite, table = load_routerbench(spec.removeprefix("routerbench:"))
        n = len(suite.head(cfg.limit))
        return suite.head(cfg.limit), table.take(np.arange(n))
    if Path(spec).exists():
        return load_jsonl(spec).head(cfg.limit), None
    raise SuiteError(f"unknown suite {spec!r}: a built-in ({', '.join(BUILTINS)}), a .jsonl "
                     "suite or a RouterBench-style table")


def load_policies(names: Sequence[str] | None, kwargs: dict[str, dict]
                  ) -> tuple[dict[str, Policy], dict[str, str]]:
    """{name: Policy} for the router's registered policies (the oracle among them, scored
    on the table's measured quality: :meth:`OraclePolicy.score_table`), and {name: reason}
    for those that could not be built."""
    from router.policies import get_policy, list_policies

    wanted = list(names) if names else list_policies()
    if ORACLE not in wanted and not names:
        wanted.append(ORACLE)
    out: dict[str, Policy] = {}
    skipped: dict[str, str] = {}
    for name in wanted:
        try:
            out[name] = get_policy(name, **kwargs.get(name, {}))
        except Exception as exc:  # noqa: BLE001 - one broken policy must not stop the eval
            if names:
                raise
            log.warning("policy %s skipped: %s", name, exc)
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return out, skipped


def score_tables(cfg: EvalConfig, suites: list[Suite], backends=None, progress: bool = True
                 ) -> tuple[list[PairTable], list[BackendSummary]]:
    """Run (or read from the cache) both backends on every suite."""
    from evals.harness.scoring import run_backend

    if backends is None:
        from models.registry import from_spec

        backends = (from_spec(cfg.transformer, torch_threads=cfg.torch_threads),
                    from_spec(cfg.hybrid, torch_threads=cfg.torch_threads))
    summaries = []
    for role, b in zip(("transformer", "hybrid"), backends, strict=True):
        info = b.info()
        summaries.append(BackendSummary(role, info.name, info.architecture, info.parameters, {}))
    tables = []
    for suite in suites:
        recs = []
        for summ, b in zip(summaries, backends, strict=True):
            with _bar(len(suite), f"{suite.name} / {summ.role}", progress) as bar:
                t0 = time.perf_counter()
                r, meta = run_backend(b, suite, cfg, progress=bar.update)
                summ.wall_s += time.perf_counter() - t0
            summ.identity = meta["identity"]
            summ.cached += meta["cached"]
            summ.computed += meta["computed"]
            recs.append(r)
        tables.append(table_from_records(suite, recs[0], recs[1], cfg.prices))
    return tables, summaries


def _point_metrics(scores, route, q, c) -> dict[str, float]:
    m = M.policy_metrics(scores, route, q, c)
    return {k: m[k] for k in ("quality", "cost", "share_transformer", "gap_recovered",
                              "accuracy", "auc")}


def policy_threshold(policy, cfg: EvalConfig) -> float:
    """The operating threshold of ``policy``: ``cfg.threshold`` when set (``--threshold``, for
    every policy), else the policy's own ``default_threshold()`` (0.5 for the oracle, and
    for a policy without the method)."""
    from router.policies import DEFAULT_THRESHOLD

    if cfg.threshold is not None:
        return float(cfg.threshold)
    own = getattr(policy, "default_threshold", None)
    return float(own()) if callable(own) else DEFAULT_THRESHOLD


def evaluate_policies(table: PairTable, policies: Mapping[str, Policy], cfg: EvalConfig,
                      progress: bool = True) -> tuple[list[PolicyResult], dict[str, np.ndarray]]:
    """Score every request with every policy, then sweep and bootstrap on ``table``."""
    from evals.harness.oracle import OraclePolicy
    from router.policies import decide

    if cfg.cost not in table.costs:
        raise ValueError(f"cost axis {cfg.cost!r} not available (have: {sorted(table.costs)})")
    q, c = table.quality, table.costs[cfg.cost]
    reqs = [r.routing_request() for r in table.requests]
    suites = np.array(table.suite)
    domains, kinds = np.array(table.domain), np.array(table.kind)
    results, all_scores = [], {}
    bar = _bar(len(policies), "policies", progress)
    for name, pol in policies.items():
        t0 = time.perf_counter()
        params: dict[str, object]
        if isinstance(pol, OraclePolicy):  # scored on the measured quality, not requests
            scores = pol.score_table(q, c)
            params, note = {"scale": pol.scale}, "knows each request's measured gap"
        else:
            scores = np.asarray(pol.score_batch(reqs), dtype=float)
            params = pol.params()
            note = "fell back to rules (no classifier artifact)" if pol.fallback_ else ""
        score_ms = (time.perf_counter() - t0) * 1000.0 / max(1, len(reqs))
        thr = policy_threshold(pol, cfg)
        route = np.array([decide(float(s), thr) == "transformer" for s in scores])
        all_scores[name] = scores
        if cfg.bootstrap:
            est, _ = M.bootstrap(lambda i, s=scores, r=route: M.policy_metrics(s[i], r[i], q[i], c[i]),
                                 len(q), cfg.bootstrap, cfg.seed)
            mets = {k: e.to_list() for k, e in est.items()}
        else:
            mets = {k: [finite(v), None, None] for k, v in M.policy_metrics(scores, route, q, c).items()}
        curve = M.sweep(scores, q, c)
        by_suite = {}
        for s in sorted(set(table.suite)):
            m = suites == s
            by_suite[s] = {k: finite(v) for k, v in _point_metrics(scores[m], route[m], q[m], c[m]).items()}
        by_domain = {d: float(route[domains == d].mean()) for d in sorted(set(domains))}
        by_kind = {k: float(route[kinds == k].mean()) for k in sorted(set(kinds))}
        results.append(PolicyResult(
            name=name, params={k: v for k, v in params.items() if isinstance(v, int | float | str | bool | None)},
            note=note, threshold=thr, metrics=mets, by_suite=by_suite,
            by_domain=by_domain, by_kind=by_kind,
            curve={"thresholds": [finite(t) for t in curve.thresholds], "share_t": curve.share_t.tolist(),
                   "quality": curve.quality.tolist(), "cost": curve.cost.tolist()},
            pareto=M.pareto_front(curve.cost, curve.quality).tolist(), score_ms=score_ms))
        bar.update(1)
    bar.close()
    return results, all_scores


def _groups(table: PairTable, cfg: EvalConfig, keys: list[str]) -> dict[str, dict[str, float]]:
    q, c = table.quality, table.costs[cfg.cost]
    oracle = M.oracle_choice(q, c)
    keys_arr = np.array(keys)
    out = {}
    for k in sorted(set(keys)):
        m = keys_arr == k
        out[k] = {"n": int(m.sum()), "quality_transformer": float(q[m, 0].mean()),
                  "quality_hybrid": float(q[m, 1].mean()),
                  "gap": float((q[m, 1] - q[m, 0]).mean()),  # = loss_T - loss_H for scored suites
                  "oracle_share_transformer": float(oracle[m].mean())}
    return out


def singles(table: PairTable, cfg: EvalConfig) -> dict[str, dict[str, float]]:
    q, c = table.quality, table.costs[cfg.cost]
    oracle = M.oracle_choice(q, c)
    out: dict[str, dict[str, float]] = {}
    for name, idx in (("transformer", np.ones(len(q), bool)),
                      ("hybrid", np.zeros(len(q), bool)), ("oracle", oracle)):
        row = {"quality": M.point(idx, q, c)[0], "share_transformer": float(idx.mean())}
        for axis, cost in table.costs.items():
            row[axis] = M.point(idx, q, cost)[1]
        for key, arr in table.extra.items():
            row[key] = M.point(idx, arr, c)[0]
        out[name] = row
    return out


def run_eval(cfg: EvalConfig, backends=None, progress: bool = True, argv: list[str] | None = None,
             write_requests: str | Path | None = None) -> EvalResult:
    """The whole eval. ``backends``: a (transformer, hybrid) pair; default from ``cfg``."""
    t_start = time.perf_counter()
    defaults = cfg.suites == EvalConfig().suites
    loaded, skipped_suites = [], {}
    for spec in cfg.suites:
        try:
            loaded.append(load_suite(spec, cfg))
        except MissingDependencyError as exc:
            if not defaults:
                raise
            log.warning("suite %s skipped: %s", spec, exc)
            skipped_suites[f"suite:{spec}"] = str(exc)
    to_score = [s for s, t in loaded if t is None]
    tables_in = [t for _, t in loaded if t is not None]
    summaries: list[BackendSummary] = []
    if to_score:
        if cfg.cost == "usd" and not cfg.prices:
            raise ValueError("cost 'usd' needs prices for both backends (prices: {transformer, hybrid})")
        scored, summaries = score_tables(cfg, to_score, backends, progress)
        tables_in = scored + tables_in
    table = PairTable.concat(tables_in)
    if not to_score and cfg.cost not in table.costs:  # imported tables carry $ only
        log.info("imported tables: using the 'usd' cost axis")
        cfg = replace(cfg, cost="usd")
    if len(table) == 0:
        raise SuiteError("no request has a quality under both backends")
    policies, skipped = load_policies(cfg.policies, cfg.policy_kwargs)
    skipped.update(skipped_suites)
    pol_results, all_scores = evaluate_policies(table, policies, cfg, progress)
    suite_summaries = []
    for suite, _ in loaded:
        n_scored = sum(1 for s in table.suite if s == suite.name)
        kinds: dict[str, int] = {}
        for r in suite.requests:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        suite_summaries.append(SuiteSummary(suite.name, suite.source, suite.content_hash,
                                            len(suite), n_scored, suite.domains(), kinds))
    prov = make_provenance(cfg.to_dict(), {"bootstrap": cfg.seed, "corpus_suite": CORPUS_SEED,
                                           "real_suite": REAL_SEED}, argv)
    # the input data files behind each suite that names them (sha256, licence): the real suite
    prov.data = {suite.name: list(suite.meta["files"]) for suite, _ in loaded
                 if isinstance(suite.meta.get("files"), list)}
    result = EvalResult(prov, cfg.cost, summaries, suite_summaries, singles(table, cfg),
                        _groups(table, cfg, table.domain), _groups(table, cfg, table.kind),
                        pol_results, skipped)
    prov.duration_s = time.perf_counter() - t_start
    if write_requests:
        write_request_table(table, all_scores, write_requests)
    return result


def write_request_table(table: PairTable, scores: dict[str, np.ndarray], path: str | Path) -> None:
    """One JSON line per request: ids, tags, per-backend quality and costs, every policy's score."""
    import json

    with Path(path).open("w", encoding="utf-8") as f:
        for i, r in enumerate(table.requests):
            row = {"id": r.id, "suite": table.suite[i], "domain": r.domain, "kind": r.kind,
                   "quality": table.quality[i].tolist()}
            if table.loss is not None:
                row["loss"] = table.loss[i].tolist()
                row["gap"] = float(table.loss[i, 0] - table.loss[i, 1])
            row["costs"] = {a: v[i].tolist() for a, v in table.costs.items()}
            row["scores"] = {p: float(s[i]) for p, s in scores.items()}
            f.write(json.dumps(row) + "\n")
