"""One ``archroute span-eval`` run: suites -> per-token scores (cached) -> every gate ->
summaries, the issue-#14 bar, and the learned gate's training.

Gate names: any registered gate (:data:`models.span.gates.GATES`; ``learned`` is the shipped
artifact, ``learned:PATH`` another one) and ``learned-loso``: the learned gate trained
leave-one-source-out on the real suite's trainable files (each request is routed by a gate
that never saw its source; requests from other suites or from evaluation-only files by the
gate trained on every trainable source). Every learned gate also trains on requests cut from
the reference corpus's train split (``SpanConfig.train_corpus``; in every fold). Baselines (always-transformer, always-hybrid, the
request-level oracle, the 50/50 mixture, the per-token oracle) are always measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evals.span.evaluate import (
    BASELINES,
    REF,
    CostModels,
    baseline_stats,
    by_group,
    compare,
    gate_stats,
    summarize,
)
from evals.span.score import ScoredSeq, default_cache_dir, score_suite, token_texts
from models.registry import REFERENCE_SPECS
from models.span.gates import Gate
from models.span.learned import LearnedGate

log = logging.getLogger(__name__)

LOSO = "learned-loso"
COPY_LOSO = "copy-loso"  # copy-k with k chosen on the training sources (LOSO, like learned-loso)
PSEUDO = (LOSO, COPY_LOSO)  # gates built from the real suite's trainable files at run time
FIXED = ("always-transformer", "always-hybrid")  # registry gates that repeat a baseline
NOT_GATES = (*BASELINES,)  # never "the best causal gate": the mixture runs both models


TRAIN_CORPUS = "corpus-train"  # the suite name (and source prefix) of the corpus training requests
TRAIN_CORPUS_PER_DOMAIN = 120  # requests per corpus domain (spread over the five kinds)
TRAIN_FUNCTIONS = f"{TRAIN_CORPUS}:functions"  # source of the function-completion requests


class SpanEvalError(ValueError):
    """A bad setting (unknown gate or suite, missing data); the CLI prints it and exits 2."""


@dataclass
class SpanConfig:
    """Settings of one run (saved in results.json)."""

    suites: list[str] = field(default_factory=lambda: ["humaneval", "corpus"])
    gates: list[str] | None = None  # None = every registered gate + learned-loso
    per_source: int = 40  # requests per request file in the real suite (also LOSO training)
    transformer: str = REFERENCE_SPECS["transformer"]
    hybrid: str = REFERENCE_SPECS["hybrid"]
    corpus: str = "data/corpus/val.jsonl"
    corpus_per_domain: int = 48
    train_corpus: str | None = "data/corpus/train.jsonl"  # the learned gate also trains on
    # requests cut from it (the reference corpus's TRAIN split; the corpus suite is cut from
    # the held-out split); None = the real requests only
    train_corpus_per_domain: int = TRAIN_CORPUS_PER_DOMAIN
    # function-completion requests cut from the same train split's code documents (the
    # synthetic mix's complete_function kind: code up to a point inside a def, the answer
    # continues it); 0 = none
    train_functions: int = 0
    limit: int | None = None  # first N requests of each suite
    batch_size: int = 8
    torch_threads: int | None = 1
    bootstrap: int = 1000
    seed: int = 0
    out: str = "runs/span-eval"
    cache_dir: str = field(default_factory=lambda: str(default_cache_dir()))
    use_cache: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def default_gates() -> list[str]:
    from models.span.gates import GATES

    return [g for g in GATES if g not in FIXED] + [*PSEUDO]


def pseudo_base(name: str) -> tuple[str, str] | None:
    """(pseudo gate, wrappers) when ``name`` is a run-time gate (:data:`PSEUDO`), possibly
    with wrappers after it (``learned-loso+copy-8-prompt-2+mix-0.5``); else None."""
    for p in PSEUDO:
        if name == p or name.startswith(p + "+"):
            return p, name[len(p):]
    return None


def check_gates(names: Sequence[str]) -> list[str]:
    """The names, validated (an unknown name raises :class:`SpanEvalError` listing the
    known ones; ``learned:PATH`` must load)."""
    from models.span.gates import GATES, UnknownGateError, get_gate, wrap

    for n in names:
        pb = pseudo_base(n)
        if pb is not None:
            try:
                wrap(get_gate("copy-1"), pb[1])
            except ValueError as exc:
                raise SpanEvalError(f"gate {n}: {exc}") from exc
            continue
        if n not in GATES and not n.startswith("learned:"):
            try:
                get_gate(n)  # a registered gate with wrappers
            except (OSError, ValueError, UnknownGateError):
                raise SpanEvalError(f"unknown gate {n!r}; known: {', '.join(GATES)}, "
                                    f"{', '.join(PSEUDO)} (and learned:PATH; any of them "
                                    "followed by +copy-K, +copy-K-prompt-P or +mix-M[-prompt-P][-repeat-K][-tilt-B][-lock-L])") from None
        if n == "learned" or n.startswith("learned:"):
            try:
                get_gate(n)
            except (OSError, ValueError, UnknownGateError) as exc:
                raise SpanEvalError(f"gate {n}: {exc}") from exc
    return list(names)


def load_suites(cfg: SpanConfig) -> list:
    """The suites named in ``cfg`` (built-ins or JSONL files), checked before any scoring."""
    from evals.harness.builtin import BUILTINS, load_builtin
    from evals.harness.suites import SuiteError, load_jsonl

    out = []
    for spec in cfg.suites:
        try:
            if spec in BUILTINS:
                suite = load_builtin(spec, cfg.corpus, cfg.corpus_per_domain, None, cfg.per_source)
            elif spec.endswith(".jsonl") and Path(spec).is_file():
                suite = load_jsonl(spec)
            else:
                raise SpanEvalError(f"unknown suite {spec!r}: a built-in ({', '.join(BUILTINS)}) "
                                    "or a .jsonl suite file")
        except SuiteError as exc:
            raise SpanEvalError(str(exc)) from exc
        out.append(suite.head(cfg.limit))
    return out


def load_pair(cfg: SpanConfig):
    from models.registry import from_spec

    return (from_spec(cfg.transformer, role="transformer", torch_threads=cfg.torch_threads),
            from_spec(cfg.hybrid, role="hybrid", torch_threads=cfg.torch_threads))


def train_corpus_suite(path: str | Path, per_domain: int = TRAIN_CORPUS_PER_DOMAIN):
    """Requests cut from the reference corpus's TRAIN split by the corpus suite's own
    generator (same kinds, same limits), every source named ``corpus-train:<domain>``. The
    corpus suite is cut from the held-out split (``data/corpus/val.jsonl``, documents
    disjoint by a hash of their id), so training on these never sees an evaluated document.
    Refuses the held-out file by name."""
    from dataclasses import replace

    from evals.harness.builtin import corpus_suite, reference_token_counter
    from evals.harness.suites import Suite

    path = Path(path)
    if "val" in path.stem.lower():
        raise SpanEvalError(f"{path}: the gate never trains on the held-out corpus split "
                            "(the corpus suite is cut from it)")
    suite = corpus_suite(path, per_domain, reference_token_counter())
    reqs = tuple(replace(r, domain=f"{TRAIN_CORPUS}:{r.domain}") for r in suite.requests)
    return Suite(TRAIN_CORPUS, reqs, f"corpus-train ({path})", meta=suite.meta)


def train_function_suite(path: str | Path, n: int, seed: int = 0):
    """``n`` function-completion requests from the code documents of the corpus TRAIN split
    (:func:`classifiers.training.synthetic_mix.make_request`, kind ``complete_function``), source
    :data:`TRAIN_FUNCTIONS`; prompt + reference within the corpus suite's token limit.
    Refuses the held-out file by name, as :func:`train_corpus_suite` does."""
    import random

    from classifiers.training.synthetic_mix import load_documents, make_request
    from evals.harness.builtin import MAX_TOKENS, reference_token_counter
    from evals.harness.suites import EvalRequest, Suite

    path = Path(path)
    if "val" in path.stem.lower():
        raise SpanEvalError(f"{path}: the gate never trains on the held-out corpus split "
                            "(the corpus suite is cut from it)")
    docs = sorted((d for d in load_documents(path) if d["domain"] == "code"), key=lambda d: d["id"])
    count = reference_token_counter()
    rng = random.Random(seed)
    reqs: list = []
    seen: set[str] = set()
    for i in range(n * 40):
        if len(reqs) >= n or not docs:
            break
        r = make_request(docs[rng.randrange(len(docs))], "complete_function", rng, i)
        if r is None or r.prompt in seen or (
                count is not None and count(r.prompt) + count(r.answer) > MAX_TOKENS):
            continue
        seen.add(r.prompt)
        reqs.append(EvalRequest(id=f"fn-{len(reqs):04d}:{r.doc_id}", prompt=r.prompt, reference=r.answer,
                                domain=TRAIN_FUNCTIONS, kind="complete_function"))
    return Suite(TRAIN_CORPUS, tuple(reqs), f"corpus-train functions ({path})")


def corpus_provenance(path: str | Path) -> dict:
    """The training corpus file's name, sha256, size, rows and licences (from its manifest),
    in the shape of :func:`classifiers.training.realdata.file_provenance`'s rows."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    lic: list[str] = []
    man = path.parent / "manifest.json"
    if man.is_file():
        import json

        lic = sorted({v.get("licence", "") for v in json.loads(man.read_text())["sources"].values()})
    return {"file": str(path), "sha256": h.hexdigest(), "bytes": path.stat().st_size,
            "rows": sum(1 for _ in path.open("rb")), "license": "; ".join(lic),
            "eval_only": False, "split": "train"}


def training_seqs(cfg: SpanConfig, pair, progress: bool = True,
                  scored: dict[str, list[ScoredSeq]] | None = None) -> tuple[list[ScoredSeq], list[dict]]:
    """The learned gate's training requests, scored, and the provenance of their files
    (sha256, licence): the real suite's requests from trainable files (evaluation-only and
    reserved files left out) and, with ``cfg.train_corpus``, requests cut from the
    reference corpus's train split (:func:`train_corpus_suite`)."""
    from classifiers.training.realdata import EVAL_ONLY, RESERVED
    from evals.harness.builtin import real_suite
    from evals.harness.suites import SuiteError

    if cfg.train_corpus:  # checked before anything is scored
        if Path(cfg.train_corpus).resolve() == Path(cfg.corpus).resolve():
            raise SpanEvalError(f"{cfg.train_corpus} is the corpus suite's file: the gate never "
                                "trains on the split it is evaluated on")
        if not Path(cfg.train_corpus).is_file():
            raise SpanEvalError(f"{cfg.train_corpus}: the corpus train split is missing (build "
                                "it with python -m models.training.corpus --out data/corpus)")
    try:
        suite = real_suite(per_source=cfg.per_source)
    except SuiteError as exc:
        raise SpanEvalError(f"the learned gate trains on the real suite: {exc}") from exc
    if scored is not None and "real" in scored:
        seqs = scored["real"]
    else:
        seqs = score_suite(suite.head(cfg.limit).requests, "real", pair[0], pair[1],
                           cfg.cache_dir, cfg.batch_size, progress, cfg.use_cache)
    keep = [s for s in seqs if s.source not in EVAL_ONLY
            and not any(r in s.source.lower() for r in RESERVED)]
    files = [f for f in suite.meta["files"] if Path(f["file"]).stem in {s.source for s in keep}]
    if cfg.train_corpus:
        extra = train_corpus_suite(cfg.train_corpus, cfg.train_corpus_per_domain)
        keep += score_suite(extra.head(cfg.limit).requests, TRAIN_CORPUS, pair[0], pair[1],
                            cfg.cache_dir, cfg.batch_size, progress, cfg.use_cache)
        files.append(corpus_provenance(cfg.train_corpus))
        if cfg.train_functions:
            fns = train_function_suite(cfg.train_corpus, cfg.train_functions, cfg.seed)
            keep += score_suite(fns.head(cfg.limit).requests, TRAIN_CORPUS, pair[0], pair[1],
                                cfg.cache_dir, cfg.batch_size, progress, cfg.use_cache)
    return keep, files


def gate_objects(names: Sequence[str], train: list[ScoredSeq] | None, token_text,
                 progress: bool = True) -> tuple[dict[str, object], dict]:
    """{name: Gate or per-sequence gate picker} and the LOSO gates' descriptions. A LOSO
    picker routes a real-suite request with the gate fitted without its source, anything
    else (other suites, evaluation-only files) with the one fitted on every source."""
    from models.span.gates import get_gate, wrap

    out: dict[str, object] = {}
    info: dict = {}
    pickers: dict[str, object] = {}
    for n in names:
        pb = pseudo_base(n)
        if pb is None:
            out[n] = get_gate(n)
            continue
        base, tail = pb
        if base not in pickers:
            pickers[base] = _pseudo_picker(base, train, token_text, progress, info)
        pick = pickers[base]
        out[n] = pick if not tail else (lambda seq, pick=pick, tail=tail: wrap(pick(seq), tail))
    return out, info


def _pseudo_picker(n: str, train: list[ScoredSeq] | None, token_text, progress: bool,
                   info: dict):
    from evals.span.train import loso_gates, train_gate

    assert train is not None
    folds: dict[str, Gate]
    full: Gate
    if n == LOSO:
        real = sorted({s.source for s in train if s.suite == "real"})  # the folds the
        # real suite is judged by; the corpus-train requests are in every fold's training
        lfolds = loso_gates(train, token_text, sources=real, progress=progress)
        lfull = train_gate(train, token_text, meta={"held_out": None})
        info[n] = {"folds": {k: {"threshold": g.threshold} for k, g in lfolds.items()},
                   "all_sources": {"threshold": lfull.threshold}}
        folds, full = dict(lfolds), lfull
    else:
        folds, full = copy_k_folds(train, token_text)
        info[n] = {"folds": {k: g.name for k, g in folds.items()}, "all_sources": full.name}

    def pick(seq: ScoredSeq, folds=folds, full=full):
        return folds.get(seq.source, full) if seq.suite == "real" else full

    return pick


def copy_k_folds(train: list[ScoredSeq], token_text) -> tuple[dict[str, Gate], Gate]:
    """({source: copy-k with the k of least pooled loss on the other sources}, copy-k with
    the k of least loss on all of them)."""
    from evals.span.evaluate import rollout
    from models.span.gates import MAX_MATCH, CopyGate

    ks = range(1, MAX_MATCH + 1)
    nll: dict[str, np.ndarray] = {}
    for s in train:
        row = nll.setdefault(s.source, np.zeros(len(ks)))
        for j, k in enumerate(ks):
            roles = rollout(CopyGate(k), s, token_text)
            row[j] -= float(np.where(roles, s.lp[0], s.lp[1]).sum())
    total = np.sum(list(nll.values()), axis=0)

    def best(v: np.ndarray) -> CopyGate:
        return CopyGate(ks[int(np.argmin(v))])

    return {src: best(total - v) for src, v in nll.items()}, best(total)


def bar_check(stats: dict, n_boot: int, seed: int, exclude: set[str] | frozenset = frozenset()) -> dict:
    """Issue #14's bar on one set of requests: the best causal gate's gain over the
    request-level oracle (CI above zero?) and the learned gate against the best copy-k.
    ``exclude``: gates left out (a learned gate trained on these very requests' sources)."""
    gates = [k for k in stats if k not in NOT_GATES and k not in exclude]
    if not gates:
        return {}
    loss = {k: stats[k].nll.sum() / stats[k].n.sum() for k in stats}
    best = min(gates, key=loss.__getitem__)
    gain = compare(stats, best, REF, n_boot, seed)
    lo = gain[1]
    out = {"best_gate": best, "best_gain": gain, "best_beats_oracle": lo is not None and lo > 0}
    copies = [k for k in gates if k.startswith("copy-") and "+" not in k and k != COPY_LOSO]
    learned = LOSO if LOSO in stats else next((k for k in gates if k.startswith("learned")), None)
    if copies and learned:
        best_copy = min(copies, key=loss.__getitem__)
        d = compare(stats, learned, best_copy, n_boot, seed)
        v, lo = d[0], d[1]
        out.update({"learned": learned, "best_copy": best_copy, "learned_vs_copy": d,
                    "learned_beats_copy": v is not None and v > 0,
                    "learned_beats_copy_ci": lo is not None and lo > 0})
        if COPY_LOSO in stats:
            out["learned_vs_copy_loso"] = compare(stats, learned, COPY_LOSO, n_boot, seed)
    return out


def trained_on(gate) -> set[str]:
    """The sources a learned gate was trained on (empty for rule gates)."""
    meta = getattr(gate, "meta", None) or {}
    return set(meta.get("sources", []))


def evaluate_suite(seqs: Sequence[ScoredSeq], gates: dict, token_text, costs: CostModels | None,
                   n_boot: int, seed: int, progress: bool = True) -> dict:
    """Summaries for one suite: pooled and per source, with the bar check (a learned gate
    is left out of the bar where it was trained on the requests' source: in-sample)."""
    t0 = time.perf_counter()
    stats = baseline_stats(seqs, costs)
    us: dict[str, float] = {}
    stats.update(gate_stats(gates, seqs, token_text, costs, progress, us))
    gate_s = time.perf_counter() - t0
    sources = [s.source for s in seqs]
    per_source = by_group(stats, sources, n_boot, seed)
    suite = seqs[0].suite if seqs else ""
    seen = {k: trained_on(g) if suite == "real" else set() for k, g in gates.items()}
    bars = {}
    for src in sorted(set(sources)):
        idx = np.flatnonzero(np.asarray(sources) == src)
        bars[src] = bar_check({k: v.take(idx) for k, v in stats.items()}, n_boot, seed,
                              {k for k, v in seen.items() if src in v})
    in_sample = {k for k, v in seen.items() if v & set(sources)}
    return {"requests": len(seqs), "tokens": int(sum(len(s) for s in seqs)),
            "ref_cut": int(sum(s.ref_cut for s in seqs)),
            "prompt_cut": int(sum(s.prompt_cut for s in seqs)),
            "policies": summarize(stats, n_boot, seed),
            "bar": bar_check(stats, n_boot, seed, in_sample), "in_sample": sorted(in_sample),
            "by_source": per_source, "bar_by_source": bars, "gate_seconds": gate_s,
            "gate_us_per_token": us}


def run_span_eval(cfg: SpanConfig, progress: bool = True, argv: list[str] | None = None,
                  pair=None) -> dict:
    """The whole run; returns the results dict (what results.json holds)."""
    from evals.harness.results import make_provenance

    t_start = time.perf_counter()
    names = check_gates(cfg.gates if cfg.gates else default_gates())
    suites = load_suites(cfg)
    if pair is None:
        pair = load_pair(cfg)
    token_text = token_texts(pair[0])
    costs = CostModels.for_pair(*pair)
    timings: dict[str, float] = {}
    scored: dict[str, list[ScoredSeq]] = {}
    for suite in suites:
        t0 = time.perf_counter()
        scored[suite.name] = score_suite(suite.requests, suite.name, pair[0], pair[1],
                                         cfg.cache_dir, cfg.batch_size, progress, cfg.use_cache)
        timings[f"score {suite.name}"] = time.perf_counter() - t0
    train: list[ScoredSeq] | None = None
    files: list[dict] = []
    if any(pseudo_base(n) for n in names):
        t0 = time.perf_counter()
        try:
            train, files = training_seqs(cfg, pair, progress, scored)
        except SpanEvalError as exc:
            if cfg.gates:  # asked for by name: an error
                raise
            log.warning("%s; leaving out %s", exc, ", ".join(PSEUDO))
            names = [n for n in names if pseudo_base(n) is None]
        timings["score training"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gates, loso_info = gate_objects(names, train, token_text, progress)
    timings["train LOSO gates"] = time.perf_counter() - t0
    results: dict = {"suites": {}}
    for suite in suites:
        t0 = time.perf_counter()
        res = evaluate_suite(scored[suite.name], gates, token_text, costs, cfg.bootstrap,
                             cfg.seed, progress)
        res["content_hash"] = suite.content_hash
        res["files"] = suite.meta.get("files", [])
        results["suites"][suite.name] = res
        timings[f"evaluate {suite.name}"] = time.perf_counter() - t0
    prov = make_provenance(cfg.to_dict(), {"bootstrap": cfg.seed}, argv)
    prov.duration_s = time.perf_counter() - t_start
    results.update({"gates": names, "provenance": asdict(prov), "timings_s": timings,
                    "pair": [pair[0].name, pair[1].name], "loso": loso_info,
                    "training_files": files})
    return results


def train_default(cfg: SpanConfig, out: str | Path, progress: bool = True, pair=None,
                  argv: list[str] | None = None) -> tuple[Path, LearnedGate]:
    """Train the learned gate on every trainable source of the real suite and save it to
    ``out`` (a folder or a .json path) with its training data's provenance."""
    from evals.harness.cache import backend_identity
    from evals.span.train import train_gate
    from models.provenance import git_state

    if pair is None:
        pair = load_pair(cfg)
    seqs, files = training_seqs(cfg, pair, progress)
    commit, dirty = git_state()
    pair_ids = [{k: v for k, v in backend_identity(b).items() if k != "location"} for b in pair]
    meta = {"trained_on": files, "per_source": cfg.per_source, "pair": pair_ids,
            "git_commit": commit, "git_dirty": dirty,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "archroute " + " ".join(argv[1:]) if argv else None}
    gate = train_gate(seqs, token_texts(pair[0]), meta=meta, progress=progress)
    return gate.save(out), gate
