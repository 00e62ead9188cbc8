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

A label is measured on one type, :class:`LabelRequest`: a conversation or a plain prompt, and
the reference answer. ``archroute label`` makes it from the synthetic mix
(:class:`~classifiers.training.synthetic_mix.MixRequest`, a plain prompt) or real requests
(:class:`~classifiers.training.realdata.RealRequest`, a conversation); the router makes it from a
logged request and a client's reference (``POST /v1/feedback``,
:mod:`router.learning.references`). A conversation is rendered the way each backend renders
it for generation (``Backend.render``: the chat template, or the plain fallback), and the
reference is scored after it.

Context: when prompt + reference exceed a backend's context, the reference is cut to fit
(at least :data:`MIN_ANSWER_TOKENS` of it are kept; the prompt is then cut from the left by
the backend) and the row is flagged: ``ref_cut`` (the reference was shortened;
``ref_tokens_full`` is its full length) and ``prompt_cut`` (the prompt was too). Nothing is
dropped silently: a request a backend refuses is logged and counted.

Works with any pair of backends, so a user relabels on their own pair. Labels are cached
on disk as JSONL (the request and its label on one line), appended chunk by chunk, so an
interrupted run resumes where it stopped (a line cut by a crash is ignored on reading).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from classifiers.probe import probe_of_scores
from classifiers.training.realdata import RealRequest
from classifiers.training.synthetic_mix import MixRequest
from models.base import Backend, ChatMessage, ScoreResult

log = logging.getLogger(__name__)

MARGIN = 0.05  # nats/token; |gap| at or below it is a tie
MIN_ANSWER_TOKENS = 128  # a reference cut to fit the context keeps at least this many tokens
CLASSES = ("hybrid", "transformer")  # class 1 = the transformer serves the request better
LabelSource = MixRequest | RealRequest  # what `archroute label` reads (a file's rows)


@dataclass(frozen=True)
class LabelRequest:
    """What a label is measured on: a request and its reference answer. The request is a
    conversation (``messages``, rendered by each backend) or, with ``prompt`` set, a plain
    prompt (scored as is). Build it with :meth:`chat`, :meth:`completion` or :meth:`of`."""

    id: str
    reference: str
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None

    @classmethod
    def chat(cls, id: str, messages: Sequence[ChatMessage], reference: str) -> LabelRequest:
        return cls(id, reference, tuple(messages))

    @classmethod
    def completion(cls, id: str, prompt: str, reference: str) -> LabelRequest:
        return cls(id, reference, prompt=prompt)

    @classmethod
    def of(cls, req: LabelSource | LabelRequest) -> LabelRequest:
        """A mix request (a plain prompt) or a real one (a conversation), as labelled."""
        if isinstance(req, LabelRequest):
            return req
        if isinstance(req, MixRequest):
            return cls.completion(req.id, req.prompt, req.answer)
        return cls.chat(req.id, req.messages, req.reference)

    @property
    def is_chat(self) -> bool:
        return self.prompt is None

    def text_for(self, backend: Backend) -> tuple[str, str]:
        """(prompt text, reference) as ``backend`` scores them: a plain prompt as is, a
        conversation rendered the way the backend renders it for generation."""
        if self.prompt is not None:
            return self.prompt, self.reference
        return backend.render(list(self.messages)), self.reference

    def key_text(self) -> str:
        """The request's text as the label cache keys it."""
        if self.prompt is not None:
            return self.prompt
        return json.dumps([{"role": m.role, "content": m.content} for m in self.messages])

    def size(self) -> int:
        """Characters of request and reference (chunks group similar sizes)."""
        text = self.prompt if self.prompt is not None else "".join(m.content for m in self.messages)
        return len(text) + len(self.reference)


def copy_share(answer_ids, prompt: str, backend: Backend, n: int = 4) -> float | None:
    """Share of answer tokens that complete a token ``n``-gram already seen earlier (in the
    prompt or the answer so far): how much of the answer is a verbatim repeat, the quantity
    that drives the gap on real requests. None when the tokens are unknown."""
    enc = getattr(backend, "encode", None)
    if not answer_ids or not callable(enc):
        return None
    seq = [*enc(prompt), *answer_ids]
    start = len(seq) - len(answer_ids)
    seen = {tuple(seq[j:j + n]) for j in range(0, max(0, start - n + 1))}
    hits = 0
    for i in range(start, len(seq)):
        if i - n + 1 >= 0:
            g = tuple(seq[i - n + 1:i + 1])
            hits += g in seen
            seen.add(g)
    return hits / len(answer_ids)


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


def request_key(req: LabelRequest, pair: str) -> str:
    """Cache key: the request id, its text and the backend pair's fingerprint."""
    h = hashlib.sha256(f"{pair}\0{req.key_text()}\0{req.reference}".encode()).hexdigest()[:16]
    return f"{req.id}:{h}"


def fit_to_context(backend: Backend, prompt: str, answer: str,
                   min_answer: int = MIN_ANSWER_TOKENS) -> tuple[str, dict]:
    """``answer`` cut (at a token boundary) so that prompt + answer fit the backend's
    context, and the flags: ref_cut, ref_tokens_full, prompt_cut. A backend that does not
    expose its tokenizer and context is trusted to fit (flags say nothing was checked)."""
    enc = getattr(backend, "encode", None)
    ctx = getattr(backend, "context_length", None)
    tok = getattr(backend, "tokenizer", None)
    if not callable(enc) or not isinstance(ctx, int) or tok is None:
        return answer, {"ref_cut": False, "prompt_cut": False, "ref_tokens_full": None}
    p, a = len(enc(prompt)), enc(answer)
    room = ctx - 1  # one start token
    keep = len(a) if p + len(a) <= room else max(min(min_answer, len(a)), room - p)
    keep = min(keep, room)
    cut = answer
    if keep < len(a):
        cut = tok.decode(a[:keep])
        while cut and len(enc(cut)) > keep:  # re-tokenizing may merge differently
            cut = cut[:-1]
    return cut, {"ref_cut": keep < len(a), "prompt_cut": p + min(keep, len(a)) > room,
                 "ref_tokens_full": len(a)}


LABEL_COMMAND = ("archroute label --requests ../shared/data/requests "
                 "--out data/labels/real.jsonl --threads 2")


class MissingLabelsError(FileNotFoundError):
    """A label file a command needs does not exist; the message names the command that
    makes it."""


def require_labels(path: str | Path, latest_only: bool = False) -> list[dict]:
    """:func:`read_labels` for a file the caller cannot do without: a missing file is a
    :class:`MissingLabelsError` that says how to make it (an empty list would surface later
    as a confusing error far from its cause)."""
    if not Path(path).exists():
        raise MissingLabelsError(
            f"label file {path} not found: make it with `{LABEL_COMMAND}` (about 13 minutes "
            "on 2 cores; the real requests are ../shared/data/requests, docs/classifier.md)")
    return read_labels(path, latest_only=latest_only)


def labels_hash(rows: list[dict]) -> str:
    """sha256 of label rows (key and gap, in key order): what an artifact was trained on."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["key"]):
        h.update(f"{r['key']}\t{r['gap']!r}\n".encode())
    return h.hexdigest()


def read_labels(path: str | Path, latest_only: bool = False) -> list[dict]:
    """Rows of a label file (request fields + key, pair, fp (pair fingerprint), gap, losses,
    n_tokens, label). ``latest_only`` keeps the rows measured on the same weights as the
    last row (a cache appended across retrainings holds several). A last line cut short by
    a crash is skipped with a warning; a bad line anywhere else is an error."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for k, (n, line) in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if k == len(lines):
                log.warning("%s: ignoring a truncated last line (%s)", path, exc.msg)
                continue
            raise ValueError(f"{path}:{n}: not a label row ({exc.msg})") from None
    if latest_only and rows:
        fp = rows[-1].get("fp")
        kept = [r for r in rows if r.get("fp") == fp]
        if len(kept) < len(rows):
            log.warning("%s: using the %d rows of the latest pair weights, ignoring %d older",
                        path, len(kept), len(rows) - len(kept))
        rows = kept
    return rows


def _drop_partial_line(path: Path) -> None:
    """Cut a row left without its newline by a crash, so appending starts on a new line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a partial last row (%d bytes) before appending", path,
                    len(data) - keep)
        f.truncate(keep)


def scoring_pairs(req: LabelRequest, transformer: Backend, hybrid: Backend,
                  ) -> tuple[tuple[str, str], tuple[str, str], dict]:
    """((prompt, reference) for the transformer, the same for the hybrid, flags). The
    reference is cut to fit both backends' contexts (the shorter cut is scored by both, so a
    shared tokenizer still scores the same tokens)."""
    (p1, a), (p2, _) = req.text_for(transformer), req.text_for(hybrid)
    a1, f1 = fit_to_context(transformer, p1, a)
    a2, f2 = fit_to_context(hybrid, p2, a)
    cut = a1 if len(a1) <= len(a2) else a2
    full = [f["ref_tokens_full"] for f in (f1, f2) if f["ref_tokens_full"] is not None]
    flags = {"ref_cut": len(cut) < len(a), "prompt_cut": f1["prompt_cut"] or f2["prompt_cut"],
             "ref_chars_scored": len(cut), "ref_tokens_full": full[0] if full else None}
    return (p1, cut), (p2, cut), flags


def _pairs(requests: Sequence[LabelRequest], idx: list[int], transformer: Backend,
           hybrid: Backend) -> tuple[list, list, list[dict]]:
    """(transformer pairs, hybrid pairs, flags) for a chunk (:func:`scoring_pairs`)."""
    pt, ph, flags = [], [], []
    for i in idx:
        a, b, fl = scoring_pairs(requests[i], transformer, hybrid)
        pt.append(a)
        ph.append(b)
        flags.append(fl)
    return pt, ph, flags


def _score_chunk(idx: list[int], requests: Sequence[LabelRequest], transformer: Backend,
                 hybrid: Backend) -> tuple[list[int], list[ScoreResult], list[ScoreResult], list[dict]]:
    """Score a chunk on both backends; when the batch fails, score one by one and drop the
    requests a backend refuses (logged)."""
    pt, ph, flags = _pairs(requests, idx, transformer, hybrid)
    try:
        return idx, transformer.score_batch(pt), hybrid.score_batch(ph), flags
    except Exception as exc:  # noqa: BLE001 - isolate the failing request below
        log.warning("chunk failed (%s); scoring its requests one by one", exc)
    kept, st, sh, kf = [], [], [], []
    for i, a, b, fl in zip(idx, pt, ph, flags, strict=True):
        try:
            t, h = transformer.score_batch([a])[0], hybrid.score_batch([b])[0]
        except Exception as exc:  # noqa: BLE001
            log.warning("skipping %s: %s", requests[i].id, exc)
            continue
        kept.append(i)
        st.append(t)
        sh.append(h)
        kf.append(fl)
    return kept, st, sh, kf


def label_requests(sources: Sequence[LabelSource], transformer: Backend, hybrid: Backend,
                   cache: str | Path | None = None, margin: float = MARGIN,
                   chunk_size: int = 32, progress: bool = True) -> list[dict]:
    """Score every request's answer under both backends; returns one row per request (in
    order; requests a backend refuses are skipped and logged): the request's own fields
    (``to_json``) and its label. Rows already in ``cache`` (same request text and pair) are
    reused; new rows are appended to it after each chunk."""
    requests = [LabelRequest.of(r) for r in sources]
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
            sorted(todo[b:b + block], key=lambda i: requests[i].size())]
    # the prompt probe needs one tokenizer for both (the two models read the same tokens)
    tokenizer = getattr(transformer, "tokenizer", None)
    log.info("labelling %d requests on %s (%d cached)", len(todo), pair, len(requests) - len(todo))
    out_file = None
    if cache and todo:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(Path(cache))
        out_file = Path(cache).open("a")
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="label", unit="req")
    try:
        for c in range(0, len(todo), chunk_size):
            idx = todo[c:c + chunk_size]
            idx, st, sh, flags = _score_chunk(idx, requests, transformer, hybrid)
            lines = []
            for i, t, h, fl in zip(idx, st, sh, flags, strict=True):
                gap = gap_of(t, h)
                row = {**sources[i].to_json(), "key": keys[i], "pair": pair, "fp": fp, "gap": gap,
                       "loss_transformer": t.loss, "loss_hybrid": h.loss,
                       "n_tokens": len(t.logprobs), "label": label_class(gap, margin), **fl}
                probe = probe_of_scores(tokenizer, t, h) if tokenizer is not None else None
                if probe is not None:  # the prompt probe, free from the same forward passes
                    row["probe"] = {k: (None if v != v else round(v, 5)) for k, v in probe.items()}
                if requests[i].is_chat:
                    row["copy4_share"] = copy_share(t.token_ids,
                                                    requests[i].text_for(transformer)[0],
                                                    transformer)
                cached[keys[i]] = row
                lines.append(json.dumps(row) + "\n")
            if out_file and lines:
                out_file.write("".join(lines))  # one write per chunk: whole rows or none
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
