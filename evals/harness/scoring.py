"""Run one backend over a suite: quality (teacher-forced loss of the reference, optional task
metric on a generation) and cost (FLOPs, memory, wall time, $) per request, cached."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from evals.harness.cache import ResultCache, backend_identity, cache_key
from evals.harness.config import EvalConfig
from evals.harness.suites import EvalRequest, Suite
from evals.harness.tasks import task_score

log = logging.getLogger(__name__)


@dataclass
class BackendRecord:
    """One request under one backend. Losses in nats/token, wall time in ms, memory in bytes
    (peak per sequence: KV cache + recurrent state, weights excluded)."""

    id: str
    loss: float | None  # mean negative log-likelihood of the reference (None: no reference)
    prompt_tokens: int
    ref_tokens: int
    flops: float | None  # prefill of prompt + reference, from the backend's cost model
    memory_bytes: float | None
    wall_ms: float  # measured scoring time (and generation time when generating)
    generation: str | None = None
    task_score: float | None = None  # 0..1 from the request's metric, when generating

    @classmethod
    def from_dict(cls, d: dict) -> BackendRecord:
        """A record as :func:`dataclasses.asdict` wrote it (a missing optional field: None)."""
        return cls(id=d["id"], loss=d.get("loss"), prompt_tokens=d["prompt_tokens"],
                   ref_tokens=d["ref_tokens"], flops=d.get("flops"),
                   memory_bytes=d.get("memory_bytes"), wall_ms=d["wall_ms"],
                   generation=d.get("generation"), task_score=d.get("task_score"))


def prompt_text(backend, req: EvalRequest) -> str:
    """The prompt string this backend scores: a plain prompt as is, a conversation rendered
    the way the backend renders it for generation."""
    if req.prompt is not None:
        return req.prompt
    return backend.render(list(req.messages or ()))


def count_tokens(backend, text: str) -> int:
    """Tokens of ``text`` in the backend's tokenizer (about 4 characters each when it has
    none we can reach)."""
    ids = backend.encode(text)
    if ids is not None:
        return len(ids)
    return max(1, round(len(text) / 4)) if text else 0


def scoring_settings(cfg: EvalConfig) -> dict:
    """The settings that change a record (part of the cache key)."""
    s: dict = {"generate": cfg.generate}
    if cfg.generate:
        s["gen_max_tokens"] = cfg.gen_max_tokens
    return s


def run_backend(backend, suite: Suite, cfg: EvalConfig,
                progress: Callable[[int], None] | None = None) -> tuple[list[BackendRecord], dict]:
    """Records for every request of ``suite`` (cached ones read back, the rest computed).

    Returns (records in suite order, {"identity", "cache_key", "cached", "computed"})."""
    ident = backend_identity(backend)
    key = cache_key(ident, suite.content_hash, scoring_settings(cfg))
    cache = ResultCache(cfg.cache_dir, key, f"{suite.name}-{ident['name']}", cfg.use_cache)
    todo = [r for r in suite.requests if cache.get(r.id) is None]
    cached = len(suite) - len(todo)
    if progress and cached:
        progress(cached)
    cm = backend.cost_model()
    for i in range(0, len(todo), cfg.batch_size):
        chunk = todo[i:i + cfg.batch_size]
        recs = _score_chunk(backend, chunk, cm, cfg)
        cache.put([asdict(r) for r in recs])
        if progress:
            progress(len(chunk))
    records = [BackendRecord.from_dict(cache.get(r.id)) for r in suite.requests]  # type: ignore[arg-type]
    meta = {"identity": ident, "cache_key": key, "cached": cached, "computed": len(todo),
            "cache_file": str(cache.path)}
    return records, meta


def _score_chunk(backend, chunk: list[EvalRequest], cm, cfg: EvalConfig) -> list[BackendRecord]:
    from classifiers.training.labels import fit_to_context

    prompts = [prompt_text(backend, r) for r in chunk]
    scored = [(j, r) for j, r in enumerate(chunk) if r.reference]
    # a reference longer than the backend's context is cut to fit, as the labeller does
    refs = [fit_to_context(backend, prompts[j], r.reference or "")[0] for j, r in scored]
    t0 = time.perf_counter()
    results = backend.score_batch([(prompts[j], ref) for (j, _), ref in zip(scored, refs, strict=True)]) if scored else []
    elapsed_ms = (time.perf_counter() - t0) * 1000.0
    p_tok = [count_tokens(backend, p) for p in prompts]
    r_tok = [0] * len(chunk)
    loss: list[float | None] = [None] * len(chunk)
    ctx = backend.context_length
    for (j, _), res in zip(scored, results, strict=True):
        r_tok[j] = len(res.logprobs)
        loss[j] = float(res.loss)
        if isinstance(ctx, int):  # the backend cuts long prompts from the left
            p_tok[j] = min(p_tok[j], max(0, ctx - 1 - r_tok[j]))
    total = sum(p_tok[j] + r_tok[j] for j, _ in scored) or 1
    out = []
    for j, req in enumerate(chunk):
        share = (p_tok[j] + r_tok[j]) / total if req.reference else 0.0
        wall = elapsed_ms * share  # a batch's time split by tokens (exact when batch_size=1)
        gen_text, t_score = None, None
        n_out = r_tok[j]
        if cfg.generate:
            from models.base import GenerationParams

            g0 = time.perf_counter()
            res = backend.generate(req.prompt if req.prompt is not None else list(req.messages or ()),
                                   GenerationParams(max_tokens=cfg.gen_max_tokens, temperature=0.0))
            wall += (time.perf_counter() - g0) * 1000.0
            gen_text = res.text
            t_score = task_score(req, res.text)
            if not req.reference:
                n_out = res.completion_tokens
        flops = cm.request_flops(p_tok[j], n_out) if cm is not None else None
        mem = cm.memory_bytes(p_tok[j] + n_out) if cm is not None else None
        out.append(BackendRecord(req.id, loss[j], p_tok[j], n_out, flops,
                                 float(mem) if mem is not None else None, wall, gen_text, t_score))
    return out
