"""Request labels measured on a backend pair: the mean per-token gap of the reference answer.

For each request the reference answer is scored under both backends
(``Backend.score_batch``); the label is

    gap = loss_transformer - loss_hybrid   (nats/token over the answer tokens)

positive when the hybrid predicts the answer better. The class is the sign beyond a margin:
``transformer`` when ``gap < -margin``, ``hybrid`` when ``gap > margin``, else ``tie``
(:data:`MARGIN` = 0.05 nats, about the size of the study's per-category effects; ties are
left out of classifier training and kept for the regressor and the regret).

Backends with the same tokenizer score the same tokens, so the gap is the mean of the
per-token gaps. With different tokenizers each loss is over its own tokens; the gap is then
the difference of total nats divided by the mean token count of the two.

Works with any pair of backends, so a user relabels on their own pair. Labels are cached
on disk as JSONL (the request and its label on one line), appended chunk by chunk, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from classifiers.requests import MixRequest
from models.base import Backend, ScoreResult

log = logging.getLogger(__name__)

MARGIN = 0.05  # nats/token; |gap| at or below it is a tie
CLASSES = ("hybrid", "transformer")  # class 1 = the transformer serves the request better


def gap_of(t: ScoreResult, h: ScoreResult) -> float:
    """loss_transformer - loss_hybrid in nats/token (see the module docstring)."""
    if not t.logprobs or not h.logprobs:
        return float("nan")
    if t.token_ids is not None and t.token_ids == h.token_ids or t.tokens == h.tokens:
        return sum(b - a for a, b in zip(t.logprobs, h.logprobs, strict=True)) / len(t.logprobs)
    n = (len(t.logprobs) + len(h.logprobs)) / 2
    return (sum(h.logprobs) - sum(t.logprobs)) / n


def label_class(gap: float, margin: float = MARGIN) -> str:
    """'transformer' | 'hybrid' | 'tie' for a gap in nats/token."""
    if not math.isfinite(gap) or abs(gap) <= margin:
        return "tie"
    return "hybrid" if gap > 0 else "transformer"


def backend_fingerprint(backend: Backend) -> str:
    """Name, location and parameter count, plus size and mtime of local weight files, so a
    cache never serves labels measured on other weights under the same name."""
    try:
        info = backend.info()
    except Exception:  # noqa: BLE001 - a backend that cannot describe itself: name only
        return backend.name
    parts = [info.name, info.location, str(info.parameters)]
    loc = Path(info.location) if info.location else None
    if loc is not None and loc.is_dir():
        for f in sorted(loc.glob("*.safetensors")) + sorted(loc.glob("*.bin")):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def request_key(req: MixRequest, pair: str) -> str:
    """Cache key: the request id, its text and the backend pair's fingerprint."""
    h = hashlib.sha256(f"{pair}\0{req.prompt}\0{req.answer}".encode()).hexdigest()[:16]
    return f"{req.id}:{h}"


def read_labels(path: str | Path, latest_only: bool = False) -> list[dict]:
    """Rows of a label file (request fields + key, pair, fp (pair fingerprint), gap, losses,
    n_tokens, label). ``latest_only`` keeps the rows measured on the same weights as the
    last row (a cache appended across retrainings holds several)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if latest_only and rows:
        fp = rows[-1].get("fp")
        kept = [r for r in rows if r.get("fp") == fp]
        if len(kept) < len(rows):
            log.warning("%s: using the %d rows of the latest pair weights, ignoring %d older",
                        path, len(kept), len(rows) - len(kept))
        rows = kept
    return rows


def _score_chunk(idx: list[int], requests: Sequence[MixRequest], transformer: Backend,
                 hybrid: Backend) -> tuple[list[int], list[ScoreResult], list[ScoreResult]]:
    """Score a chunk on both backends; when the batch fails, score one by one and drop the
    requests a backend refuses (logged)."""
    pairs = [(requests[i].prompt, requests[i].answer) for i in idx]
    try:
        return idx, transformer.score_batch(pairs), hybrid.score_batch(pairs)
    except Exception as exc:  # noqa: BLE001 - isolate the failing request below
        log.warning("chunk failed (%s); scoring its requests one by one", exc)
    kept, st, sh = [], [], []
    for i, pair in zip(idx, pairs, strict=True):
        try:
            t, h = transformer.score_batch([pair])[0], hybrid.score_batch([pair])[0]
        except Exception as exc:  # noqa: BLE001
            log.warning("skipping %s: %s", requests[i].id, exc)
            continue
        kept.append(i)
        st.append(t)
        sh.append(h)
    return kept, st, sh


def label_requests(requests: Sequence[MixRequest], transformer: Backend, hybrid: Backend,
                   cache: str | Path | None = None, margin: float = MARGIN,
                   chunk_size: int = 32, progress: bool = True) -> list[dict]:
    """Score every request's answer under both backends; returns one row per request (in
    order; requests a backend refuses are skipped and logged). Rows already in ``cache``
    (same request text and pair) are reused; new rows are appended to it after each chunk."""
    pair = f"{transformer.name}|{hybrid.name}"
    fingerprint = f"{backend_fingerprint(transformer)}\0{backend_fingerprint(hybrid)}"
    fp = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    cached = {r["key"]: r for r in read_labels(cache)} if cache else {}
    keys = [request_key(r, fingerprint) for r in requests]
    todo = [i for i, k in enumerate(keys) if k not in cached]
    # similar lengths share a chunk (less padding), sorted within blocks of 8 chunks only, so
    # a run stopped early has labelled a representative part of the mix, not the short end
    block = 8 * chunk_size
    todo = [i for b in range(0, len(todo), block) for i in
            sorted(todo[b:b + block], key=lambda i: len(requests[i].prompt) + len(requests[i].answer))]
    log.info("labelling %d requests on %s (%d cached)", len(todo), pair, len(requests) - len(todo))
    out_file = None
    if cache and todo:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        out_file = Path(cache).open("a")
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="label", unit="req")
    try:
        for c in range(0, len(todo), chunk_size):
            idx = todo[c:c + chunk_size]
            idx, st, sh = _score_chunk(idx, requests, transformer, hybrid)
            for i, t, h in zip(idx, st, sh, strict=True):
                gap = gap_of(t, h)
                row = {**requests[i].to_json(), "key": keys[i], "pair": pair, "fp": fp, "gap": gap,
                       "loss_transformer": t.loss, "loss_hybrid": h.loss,
                       "n_tokens": len(t.logprobs), "label": label_class(gap, margin)}
                cached[keys[i]] = row
                if out_file:
                    out_file.write(json.dumps(row) + "\n")
            if out_file:
                out_file.flush()
            if bar:
                bar.update(len(idx))
    finally:
        if bar:
            bar.close()
        if out_file:
            out_file.close()
    return [cached[k] for k in keys if k in cached]


def summarize(rows: Sequence[dict], margin: float = MARGIN) -> dict[str, float]:
    """Label distribution: mean/std of the gap, share of requests each backend wins beyond
    the margin, and the count."""
    import numpy as np

    g = np.array([r["gap"] for r in rows], float)
    g = g[np.isfinite(g)]
    if not len(g):
        return {"n": 0}
    return {"n": int(len(g)), "gap_mean": float(g.mean()), "gap_std": float(g.std()),
            "hybrid_wins": float((g > margin).mean()),
            "transformer_wins": float((g < -margin).mean()), "margin": margin}


def by_group(rows: Sequence[dict], key: str, margin: float = MARGIN) -> dict[str, dict[str, float]]:
    """:func:`summarize` per value of ``key`` (e.g. 'kind' or 'domain')."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(key)), []).append(r)
    return {g: summarize(rs, margin) for g, rs in sorted(groups.items())}


def group_table(rows: Sequence[dict], key: str, margin: float = MARGIN) -> str:
    """Markdown table of the gap distribution per ``key``."""
    lines = [f"| {key} | n | gap mean | gap std | hybrid wins | transformer wins |",
             "| --- | --- | --- | --- | --- | --- |"]
    for g, s in {**by_group(rows, key, margin), "all": summarize(rows, margin)}.items():
        if s.get("n"):
            lines.append(f"| {g} | {s['n']} | {s['gap_mean']:+.3f} | {s['gap_std']:.3f} | "
                         f"{s['hybrid_wins']:.1%} | {s['transformer_wins']:.1%} |")
    return "\n".join(lines)
