"""Per-token log-probabilities of a corpus under two backends, in fixed-length windows.

Two paths, same output (a list of :class:`ScoredWindow`):

- fast: both backends expose ``tokenizer`` (same vocabulary) and ``score_ids``. Each
  document is tokenized once and cut into windows of ``window - 1`` tokens; each window is
  scored as ``[prefix] + tokens`` (``prefix`` is the backend's start token), so every
  token of the window is scored and the model sees at most ``window`` positions.
- generic: anything with :meth:`models.base.Backend.score_batch` (an OpenAI-compatible
  upstream, a fake). Windows are text chunks (cut at token boundaries when a tokenizer is
  at hand) scored as ``score_batch([("", chunk)])``. When the two backends tokenize alike
  the tokens are paired one to one; otherwise log-probabilities are summed over the
  coarsest segmentation both tokenizations share (the gap is then per segment).

Results are cached on disk per backend (weights hash or spec), corpus (content hash) and
window settings, one file per batch, so an interrupted or repeated run does not recompute.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evals.analysis.corpus import Document, corpus_fingerprint

log = logging.getLogger(__name__)

MIN_WINDOW_TOKENS = 8  # a document's last, shorter window is kept when it has this many


@dataclass
class Window:
    """Tokens of one window: ``offsets`` (n, 2) character spans in the document's text."""

    doc: int
    offsets: np.ndarray
    ids: np.ndarray

    @property
    def text_span(self) -> tuple[int, int]:
        return int(self.offsets[0, 0]), int(self.offsets[-1, 1])


@dataclass
class ScoredWindow(Window):
    """A window with log p (nats) of each token under the transformer and the hybrid."""

    lp_t: np.ndarray | None = None
    lp_h: np.ndarray | None = None


# ---------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------
def backend_fingerprint(backend, spec: str) -> str:
    """Identity of a backend for the cache: its weights' hash when local, else the spec."""
    h = hashlib.sha1(spec.encode())
    path = getattr(backend, "path", None)
    if path is not None and Path(path).is_dir():
        for f in sorted(Path(path).glob("*")):
            if f.suffix in (".safetensors", ".bin", ".json"):
                h.update(f.name.encode())
                h.update(f.read_bytes())
    else:
        info = backend.info()
        h.update(f"{info.name}|{info.location}".encode())
    return h.hexdigest()[:16]


class BatchCache:
    """One JSON-free ``.npz`` per batch of windows under ``root`` (None: no caching)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def _path(self, i: int) -> Path:
        assert self.root is not None
        return self.root / f"batch_{i:05d}.npz"

    def get(self, i: int) -> dict[str, np.ndarray] | None:
        if self.root is None or not self._path(i).exists():
            return None
        with np.load(self._path(i), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def put(self, i: int, arrays: dict[str, np.ndarray]) -> None:
        if self.root is None:
            return
        tmp = self._path(i).with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stub: **kwds could fill allow_pickle
        tmp.replace(self._path(i))


def _cache_for(root: Path | None, backend, spec: str, key: dict) -> BatchCache:
    if root is None:
        return BatchCache(None)
    settings = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in backend.name)[:40]
    return BatchCache(root / f"{name}-{backend_fingerprint(backend, spec)}" / settings)


# ---------------------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------------------
def token_windows(docs: Sequence[Document], tokenizer, window: int) -> list[Window]:
    """Cut each document's tokens into windows of ``window - 1`` tokens (one slot is left
    for the start token)."""
    if window < MIN_WINDOW_TOKENS + 1:
        raise ValueError(f"window must be > {MIN_WINDOW_TOKENS}, got {window}")
    out: list[Window] = []
    size = window - 1
    for d, doc in enumerate(docs):
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        off = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        for s in range(0, len(ids), size):
            if len(ids) - s < MIN_WINDOW_TOKENS:
                break
            out.append(Window(d, off[s:s + size], ids[s:s + size]))
    return out


def cap_windows(windows: list[Window], docs: Sequence[Document],
                max_tokens: int | None) -> list[Window]:
    """At most ``max_tokens`` tokens, taken round-robin over domains (so a cap keeps every
    domain), returned in corpus order."""
    if max_tokens is None:
        return windows
    by_dom: dict[str, list[int]] = {}
    for i, w in enumerate(windows):
        by_dom.setdefault(docs[w.doc].domain, []).append(i)
    queues = [list(reversed(v)) for _, v in sorted(by_dom.items())]
    keep: list[int] = []
    total = 0
    while total < max_tokens and any(queues):
        for q in queues:
            if q and total < max_tokens:
                i = q.pop()
                keep.append(i)
                total += len(windows[i].ids)
    return [windows[i] for i in sorted(keep)]


# ---------------------------------------------------------------------------------------
# fast path
# ---------------------------------------------------------------------------------------
def same_tokenizer(a, b) -> bool:
    """True when both backends can be scored on shared token ids."""
    ta, tb = a.tokenizer, b.tokenizer
    if ta is None or tb is None or not hasattr(a, "score_ids") or not hasattr(b, "score_ids"):
        return False
    return ta.get_vocab() == tb.get_vocab() and a.prefix_id == b.prefix_id


def score_windows_ids(backend, windows: Sequence[Window], cache: BatchCache,
                      batch_size: int, progress: Callable[[int], None]) -> list[np.ndarray]:
    """log p of every token of every window under ``backend`` (fast path)."""
    prefix = backend.prefix_id
    out: list[np.ndarray] = []
    for b, lo in enumerate(range(0, len(windows), batch_size)):
        chunk = windows[lo:lo + batch_size]
        got = cache.get(b)
        if got is None:
            seqs = [([prefix] if prefix is not None else []) + w.ids.tolist() for w in chunk]
            lps = backend.score_ids(seqs)
            if prefix is None:  # the first token of each window is context only
                lps = [np.concatenate([[np.nan], lp]) for lp in lps]
            got = {"lp": np.concatenate(lps).astype(np.float32),
                   "len": np.asarray([len(x) for x in lps])}
            cache.put(b, got)
        out.extend(np.split(got["lp"], np.cumsum(got["len"])[:-1]))
        progress(sum(len(w.ids) for w in chunk))
    return out


# ---------------------------------------------------------------------------------------
# generic path (Backend.score_batch)
# ---------------------------------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (byte-level BPE token strings -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_offsets(text: str, tokens: Sequence[str]) -> np.ndarray:
    """Character spans of ``tokens`` in ``text``: tokens that concatenate to the text, or
    byte-level BPE strings ("Ġthe"); otherwise a left-to-right search."""
    lens = [len(t) for t in tokens]
    if "".join(tokens) == text:
        ends = np.cumsum(lens)
        return np.stack([ends - lens, ends], axis=1) if lens else np.zeros((0, 2), np.int64)
    dec = _byte_decoder()
    if all(ch in dec for t in tokens for ch in t):
        nbytes = np.cumsum([len(t) for t in tokens])
        data = text.encode("utf-8")
        if nbytes.size and nbytes[-1] == len(data):
            starts = np.frombuffer(data, np.uint8) & 0xC0 != 0x80
            char_at = np.concatenate([[0], np.cumsum(starts)])  # byte offset -> char offset
            ends = char_at[nbytes]
            return np.stack([np.concatenate([[0], ends[:-1]]), ends], axis=1)
    spans, pos = [], 0
    for t in tokens:
        j = text.find(t, pos)
        j = pos if j < 0 else j
        spans.append((j, min(len(text), j + len(t))))
        pos = spans[-1][1]
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def _common_segments(off_a: np.ndarray, lp_a: np.ndarray, off_b: np.ndarray,
                     lp_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum log p over the coarsest segmentation shared by two tokenizations of a text."""
    start = max(off_a[0, 0], off_b[0, 0])
    ka, kb = off_a[:, 0] >= start, off_b[:, 0] >= start
    off_a, lp_a, off_b, lp_b = off_a[ka], lp_a[ka], off_b[kb], lp_b[kb]
    ends = np.intersect1d(off_a[:, 1], off_b[:, 1])
    seg_a = np.searchsorted(ends, off_a[:, 1])
    seg_b = np.searchsorted(ends, off_b[:, 1])
    n = len(ends)
    sa = np.bincount(seg_a[seg_a < n], lp_a[seg_a < n], minlength=n)
    sb = np.bincount(seg_b[seg_b < n], lp_b[seg_b < n], minlength=n)
    starts = np.concatenate([[start], ends[:-1]])
    return np.stack([starts, ends], axis=1), sa, sb


def text_windows(docs: Sequence[Document], tokenizer, window: int) -> list[Window]:
    """Windows for the generic path: spans of ``window - 1`` tokens when a tokenizer is
    given, else about ``3 * window`` characters cut at whitespace."""
    if tokenizer is not None:
        return token_windows(docs, tokenizer, window)
    out = []
    for d, doc in enumerate(docs):
        pos, n = 0, len(doc.text)
        while pos < n:
            end = min(n, pos + 3 * window)
            if end < n:
                cut = doc.text.rfind(" ", pos + window, end)
                end = cut if cut > pos else end
            out.append(Window(d, np.asarray([[pos, end]]), np.zeros(1, np.int64)))
            pos = end
    return out


def score_windows_text(backend, docs: Sequence[Document], windows: Sequence[Window],
                       cache: BatchCache, batch_size: int,
                       progress: Callable[[int], None]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(offsets in the document, log p) per window, through ``backend.score_batch``."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for b, lo in enumerate(range(0, len(windows), batch_size)):
        chunk = windows[lo:lo + batch_size]
        got = cache.get(b)
        if got is None:
            texts = [docs[w.doc].text[w.text_span[0]:w.text_span[1]] for w in chunk]
            results = backend.score_batch([("", t) for t in texts])
            offs, lps = [], []
            for w, t, r in zip(chunk, texts, results, strict=True):
                offs.append(token_offsets(t, r.tokens) + w.text_span[0])
                lps.append(np.asarray([np.nan if x is None else x for x in r.logprobs], np.float64))
            got = {"off": np.concatenate(offs).astype(np.int64),
                   "lp": np.concatenate(lps), "len": np.asarray([len(x) for x in lps])}
            cache.put(b, got)
        cuts = np.cumsum(got["len"])[:-1]
        out.extend(zip(np.split(got["off"], cuts), np.split(got["lp"], cuts), strict=True))
        progress(sum(len(w.ids) for w in chunk))
    return out


def pair_generic(docs: Sequence[Document], windows: Sequence[Window], res_t, res_h,
                 vocab: dict[str, int]) -> list[ScoredWindow]:
    """Pair two generic scorings token by token (same spans) or by common segments."""
    out = []
    for w, (off_t, lp_t), (off_h, lp_h) in zip(windows, res_t, res_h, strict=True):
        if len(off_t) == 0 or len(off_h) == 0:
            continue
        if off_t.shape == off_h.shape and np.array_equal(off_t, off_h):
            off, a, b = off_t, lp_t, lp_h
        else:
            off, a, b = _common_segments(off_t, lp_t, off_h, lp_h)
        ok = np.isfinite(a) & np.isfinite(b)
        off, a, b = off[ok], a[ok], b[ok]
        text = docs[w.doc].text
        ids = np.asarray([vocab.setdefault(text[s:e], len(vocab)) for s, e in off], np.int64)
        out.append(ScoredWindow(w.doc, off, ids, a.astype(np.float32), b.astype(np.float32)))
    return out


# ---------------------------------------------------------------------------------------
# both backends
# ---------------------------------------------------------------------------------------
def score_pair(docs: Sequence[Document], transformer, hybrid, *, specs: tuple[str, str],
               window: int = 512, max_tokens: int | None = None, batch_size: int = 8,
               cache_root: Path | None = None, progress: bool = True) -> list[ScoredWindow]:
    """Score ``docs`` with both backends; fast path when they share a tokenizer."""
    from tqdm import tqdm

    fast = same_tokenizer(transformer, hybrid)
    tokenizer = transformer.tokenizer or hybrid.tokenizer
    windows = token_windows(docs, tokenizer, window) if fast else \
        text_windows(docs, tokenizer, window)
    windows = cap_windows(windows, docs, max_tokens)
    key = {"corpus": corpus_fingerprint(list(docs)), "window": window, "max_tokens": max_tokens,
           "batch_size": batch_size, "fast": fast, "n_windows": len(windows)}
    log.info("%d windows, %d tokens, %s path", len(windows),
             sum(len(w.ids) for w in windows), "token-id" if fast else "generic score")
    by_ids: list[list[np.ndarray]] = []  # fast path: log p per window, per backend
    by_text: list[list[tuple[np.ndarray, np.ndarray]]] = []  # generic: (offsets, log p)
    for backend, spec in ((transformer, specs[0]), (hybrid, specs[1])):
        cache = _cache_for(cache_root, backend, spec, key)
        total = sum(len(w.ids) for w in windows)
        with tqdm(total=total, desc=f"scoring {backend.name}", unit="tok",
                  disable=not progress) as bar:
            if fast:
                by_ids.append(score_windows_ids(backend, windows, cache, batch_size, bar.update))
            else:
                by_text.append(score_windows_text(backend, docs, windows, cache, batch_size,
                                                  bar.update))
    if fast:
        return [ScoredWindow(w.doc, w.offsets, w.ids, a, b)
                for w, a, b in zip(windows, by_ids[0], by_ids[1], strict=True)]
    return pair_generic(docs, windows, by_text[0], by_text[1], {})
