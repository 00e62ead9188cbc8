"""Per-token teacher-forced scores of both backends on (prompt, reference answer) pairs.

For every answer token ``i`` and each backend: the log-probability of the true token
(``lp``, nats) and the entropy of the backend's next-token distribution at that position
(``ent``, nats). One forward pass over start token + prompt + answer per request and
backend (right-padded batches, float32 on CPU), on the in-process models themselves.

Prompts are rendered the way the router renders them (``Backend.render``: the chat template
or the plain fallback, after the start token), exactly as the request labels and the eval
harness score them: :func:`evals.harness.scoring.prompt_text` for the prompt,
:func:`classifiers.training.labels.fit_to_context` to cut a reference that does not fit the context
(the shorter cut of the two backends is scored by both), and the prompt cut from the left
as ``HFBackend.score_batch`` does. So ``lp`` equals ``backend.score(prompt, reference)``'s
log-probs.

Token-level routing needs one token stream, so both backends must tokenize the answer the
same way (a shared tokenizer); a pair that does not is refused.

Cache: one ``.npz`` per request (no pickle) under ``<cache>/<pair>/<suite>/``, keyed by both
backends' identities (a content hash of weights and config), the request id and a hash of
its prompt and reference; written atomically after each batch, so a stopped run resumes
and a rerun is instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evals.harness.suites import EvalRequest

log = logging.getLogger(__name__)

ROLES = ("transformer", "hybrid")  # index 0 and 1 of every (2, n) array
SCORE_VERSION = 1  # bump when the scoring method or the file format changes


class SpanScoringError(ValueError):
    """A pair or a request that cannot be scored token by token (the message says why)."""


@dataclass
class ScoredSeq:
    """One request scored by both backends.

    ``prompt_ids``: the tokens a backend sees before the answer (start token first; the
    prompt possibly cut from the left), int32 (P,). ``answer_ids``: the reference's tokens,
    int32 (n,). ``lp``, ``ent``: float32 (2, n), row 0 the transformer, row 1 the hybrid:
    log p(answer_i | prefix) and the entropy of the distribution that predicted it (nats).
    """

    id: str
    suite: str
    source: str  # the request's domain (for the real suite: its file, the source group)
    kind: str
    prompt_ids: np.ndarray
    answer_ids: np.ndarray
    lp: np.ndarray
    ent: np.ndarray
    ref_cut: bool = False
    prompt_cut: bool = False

    def __len__(self) -> int:
        return len(self.answer_ids)

    @property
    def meta(self) -> dict:
        return {"id": self.id, "suite": self.suite, "source": self.source, "kind": self.kind,
                "ref_cut": self.ref_cut, "prompt_cut": self.prompt_cut}


def default_cache_dir() -> Path:
    base = os.environ.get("ARCHROUTE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "archroute")
    return Path(base) / "span"


def pair_id(transformer, hybrid) -> str:
    """A short hash of both backends' identities (weights and config) and the method."""
    from evals.harness.cache import backend_identity

    blob = json.dumps({"v": SCORE_VERSION, "t": backend_identity(transformer),
                       "h": backend_identity(hybrid)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)[:60]


def request_key(req: EvalRequest, prompts: Sequence[str]) -> str:
    h = hashlib.sha256("\0".join([req.id, *prompts, req.reference or ""]).encode())
    return f"{_safe(req.id)}-{h.hexdigest()[:16]}"


def save_seq(path: Path, seq: ScoredSeq) -> None:
    """Write atomically (a temporary file renamed), so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, prompt_ids=seq.prompt_ids.astype(np.int32),
                 answer_ids=seq.answer_ids.astype(np.int32), lp=seq.lp.astype(np.float32),
                 ent=seq.ent.astype(np.float32), meta=np.array(json.dumps(seq.meta)))
    os.replace(tmp, path)


def load_seq(path: Path) -> ScoredSeq | None:
    """A cached sequence, or None when the file is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return ScoredSeq(meta["id"], meta["suite"], meta["source"], meta["kind"],
                             z["prompt_ids"], z["answer_ids"], z["lp"], z["ent"],
                             bool(meta.get("ref_cut")), bool(meta.get("prompt_cut")))
    except (OSError, ValueError, KeyError) as exc:
        if path.exists():
            log.warning("span cache %s unreadable (%s); rescoring", path, exc)
        return None


def _model(backend):
    model = getattr(backend, "model", None)
    if model is None or not hasattr(backend, "tokenizer"):
        raise SpanScoringError(
            f"{backend.name}: span scoring needs an in-process model (HFBackend: local "
            "weights), for the entropies of its full next-token distributions")
    return model


def forward_scores(backend, seqs: Sequence[Sequence[int]], starts: Sequence[int],
                   batch_size: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """(log p of each true token, entropy) at positions ``starts[k]..len(seqs[k]) - 1`` of
    each sequence, float32 arrays. Sequences are sorted by length and right-padded (causal
    models: padding on the right never changes earlier positions), as ``score_ids`` does."""
    import torch

    _model(backend)  # an in-process model, or a clear error
    out: list = [None] * len(seqs)
    with torch.no_grad():
        for idx, ids, logits in backend.forward_batches(seqs, batch_size):
            for r, i in enumerate(idx):
                s, n = starts[i], len(seqs[i])
                logp = torch.log_softmax(logits[r, s - 1:n - 1], dim=-1)
                tgt = ids[r, s:n].unsqueeze(-1)
                lp = logp.gather(-1, tgt).squeeze(-1)
                ent = -(logp.exp() * logp).sum(-1)
                out[i] = (lp.cpu().numpy().astype(np.float32), ent.cpu().numpy().astype(np.float32))
    return out


def _prepare(req: EvalRequest, transformer, hybrid) -> tuple[list[list[int]], int, np.ndarray, dict]:
    """Per backend the scored sequence (start token, prompt, answer), the answer's start,
    the answer ids and the cut flags."""
    from classifiers.training.labels import fit_to_context
    from evals.harness.scoring import prompt_text

    if not req.reference:
        raise SpanScoringError(f"{req.id}: no reference answer to score")
    prompts = [prompt_text(b, req) for b in (transformer, hybrid)]
    cuts = [fit_to_context(b, p, req.reference) for b, p in zip((transformer, hybrid), prompts, strict=True)]
    answer = min((c[0] for c in cuts), key=len)
    answers = [b.encode(answer) for b in (transformer, hybrid)]
    if answers[0] != answers[1]:
        raise SpanScoringError(
            f"{req.id}: the two backends tokenize the answer differently; token-level routing "
            "needs a shared tokenizer")
    c = answers[0]
    if not c:
        raise SpanScoringError(f"{req.id}: the reference has no tokens")
    seqs, prompt_cut = [], False
    for b, p_text in zip((transformer, hybrid), prompts, strict=True):
        p = b.encode(p_text)
        room = b.context_length - 1 - len(c)
        if room < 0:
            raise SpanScoringError(f"{req.id}: answer ({len(c)} tokens) exceeds the context")
        prompt_cut |= room < len(p)
        p = p[-room:] if room else []
        seqs.append([b.prefix_id, *p, *c])
    if len(seqs[0]) != len(seqs[1]):
        raise SpanScoringError(f"{req.id}: the backends render the prompt to different "
                               "lengths; token-level routing needs one token stream")
    flags = {"ref_cut": len(answer) < len(req.reference), "prompt_cut": prompt_cut}
    return seqs, len(seqs[0]) - len(c), np.asarray(c, np.int32), flags


def score_suite(reqs: Sequence[EvalRequest], suite: str, transformer, hybrid,
                cache_dir: str | Path | None = None, batch_size: int = 8,
                progress: bool = True, use_cache: bool = True) -> list[ScoredSeq]:
    """Every request with a reference, scored by both backends (cached ones read back).
    Requests without a reference are skipped (logged); the order is the suite's."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / pair_id(transformer, hybrid) / _safe(suite)
    reqs = [r for r in reqs if r.reference]
    from evals.harness.scoring import prompt_text

    keys = [request_key(r, [prompt_text(b, r) for b in (transformer, hybrid)]) for r in reqs]
    done: dict[str, ScoredSeq] = {}
    if use_cache:
        for k in keys:
            s = load_seq(folder / f"{k}.npz")
            if s is not None:
                done[k] = s
    todo = [i for i, k in enumerate(keys) if k not in done]
    log.info("span scoring %s: %d requests (%d cached) in %s", suite, len(reqs),
             len(reqs) - len(todo), folder)
    prepared = {i: _prepare(reqs[i], transformer, hybrid) for i in todo}
    todo.sort(key=lambda i: len(prepared[i][0][0]))
    from tqdm.auto import tqdm

    chunk = batch_size * 4  # a few batches between cache writes
    with tqdm(total=len(todo), desc=f"score {suite}", unit="req", disable=not progress or not todo,
              dynamic_ncols=True) as bar:
        for c0 in range(0, len(todo), chunk):
            idx = todo[c0:c0 + chunk]
            res = [forward_scores(b, [prepared[i][0][k] for i in idx], [prepared[i][1] for i in idx],
                                  batch_size) for k, b in enumerate((transformer, hybrid))]
            for j, i in enumerate(idx):
                seqs, start, ans, flags = prepared[i]
                r = reqs[i]
                s = ScoredSeq(r.id, suite, r.domain, r.kind, np.asarray(seqs[0][:start], np.int32),
                              ans, np.stack([res[0][j][0], res[1][j][0]]),
                              np.stack([res[0][j][1], res[1][j][1]]), **flags)
                done[keys[i]] = s
                if use_cache:
                    save_seq(folder / f"{keys[i]}.npz", s)
            bar.update(len(idx))
    return [done[k] for k in keys]


def token_texts(backend) -> Callable[[int], str]:
    """A token id -> its text (decoded alone), tabulated once for the whole vocabulary."""
    tok = backend.tokenizer
    n = len(tok)
    table = [tok.decode([i]) for i in range(n)]

    def text(i: int) -> str:
        return table[i] if 0 <= i < n else ""

    return text
