"""A learned text representation of the instruction: hashed word n-grams + a linear model.

The hand-written features (:mod:`classifiers.features`) say what a request looks like; this
says what it asks, in the user's own words, without a model forward pass. The text is the
head and tail (:data:`TEXT_CHARS` each) of the last user turn, where instructions sit, and
three shape tokens: a long middle between them, a fenced block, the number of turns. Words
(lowercased letter runs, numbers as ``0``), word bigrams and the shape tokens are hashed (crc32) into :data:`N_BUCKETS` buckets with binary counts; a logistic
regression over them gives a logit that the classifier takes as one more feature
(``text_logit``). Cost: one pass over about 600 characters, a few tens of microseconds.

The weights ship as ``text_weights.npy`` (float32, :data:`N_BUCKETS` values, no pickle).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

from classifiers.request import RoutingRequest

N_BUCKETS = 1 << 15
TEXT_CHARS = 300
_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


def tokens(request: RoutingRequest) -> list[str]:
    """The n-gram tokens of a request's instruction (see the module docstring)."""
    last = request.last_user
    head, tail = last[:TEXT_CHARS].lower(), last[-TEXT_CHARS:].lower() if len(last) > TEXT_CHARS else ""
    out: list[str] = []
    for part, tag in ((head, "h"), (tail, "t")):
        words = ["0" if w.isdigit() else w for w in _WORD.findall(part)]
        out += [f"{tag}:{w}" for w in words if w.isalpha()]
        out += [f"{tag}:{a}_{b}" for a, b in zip(words, words[1:], strict=False)]
    body = last[TEXT_CHARS:-TEXT_CHARS] if len(last) > 2 * TEXT_CHARS else ""
    if body:
        out.append("shape:long")
    if "```" in last:
        out.append("shape:fenced")
    if len(request.messages) > 1:
        out.append(f"shape:turns{min(len(request.messages), 5)}")
    return out


def buckets(request: RoutingRequest) -> np.ndarray:
    """Distinct hash buckets of a request's tokens (int64 array)."""
    return np.unique(np.fromiter((zlib.crc32(t.encode()) & (N_BUCKETS - 1) for t in tokens(request)),
                                 np.int64))


def matrix(requests: Sequence[RoutingRequest]):
    """Binary CSR matrix (n, :data:`N_BUCKETS`)."""
    from scipy.sparse import csr_matrix

    rows = [buckets(r) for r in requests]
    indptr = np.cumsum([0, *map(len, rows)])
    idx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return csr_matrix((np.ones(len(idx), np.float32), idx, indptr), shape=(len(rows), N_BUCKETS))


class HashedTextModel:
    """Logistic regression on hashed instruction n-grams; ``logit`` is its raw score."""

    def __init__(self, C: float = 0.3) -> None:
        self.C = C
        self.weights: np.ndarray | None = None
        self.bias = 0.0

    def fit(self, requests: Sequence[RoutingRequest], y: np.ndarray,
            sample_weight: np.ndarray | None = None) -> HashedTextModel:
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=self.C, max_iter=2000, solver="liblinear")
        lr.fit(matrix(requests), np.asarray(y), sample_weight=sample_weight)
        self.weights = lr.coef_[0].astype(np.float32)
        self.bias = float(lr.intercept_[0])
        return self

    def logit(self, request: RoutingRequest) -> float:
        assert self.weights is not None, "fit or load the text model first"
        return float(self.weights[buckets(request)].sum() + self.bias)

    def logits(self, requests: Sequence[RoutingRequest]) -> np.ndarray:
        return np.array([self.logit(r) for r in requests])

    def save(self, path) -> None:
        assert self.weights is not None
        np.save(path, np.append(self.weights, np.float32(self.bias)), allow_pickle=False)

    @classmethod
    def load(cls, path) -> HashedTextModel:
        w = np.load(path, allow_pickle=False)
        if w.shape != (N_BUCKETS + 1,):
            raise ValueError(f"{path}: expected {N_BUCKETS + 1} weights, got {w.shape}")
        m = cls()
        m.weights, m.bias = w[:-1].astype(np.float32), float(w[-1])
        return m
