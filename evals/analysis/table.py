"""The per-token table: one row per scored token, losses under both backends, the gap and
the token's categories (see :mod:`classifiers.categories`).

Columns (units):
  window, doc, domain, pos (index in the window, tokens), token_id, token (text),
  loss_t, loss_h (nats), gap = loss_t - loss_h (nats; positive = hybrid better),
  word_class, word_start, repeat_n (longest repeated n-gram the token completes within
  its window, 0 = first occurrence), prev_dist (tokens to the previous occurrence of the
  same token in the window, -1 none), local_reuse (occurrences in the previous 128
  tokens), bracket ("open" / "close" / ""), bracket_kind, log_freq (natural log of the
  token's unigram frequency over the analysed tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from classifiers.categories import (
    language_for,
    local_reuse,
    previous_distance,
    repeat_lengths,
    token_categories,
)
from evals.analysis.corpus import Document
from evals.analysis.scoring import ScoredWindow


def build_table(docs: Sequence[Document], scored: Sequence[ScoredWindow]):
    """A pandas DataFrame of every scored token (tokens without a finite loss are dropped)."""
    import pandas as pd

    by_doc: dict[int, list[int]] = {}
    for k, w in enumerate(scored):
        by_doc.setdefault(w.doc, []).append(k)
    parts = []
    for d, ks in sorted(by_doc.items()):
        doc = docs[d]
        offsets = np.concatenate([scored[k].offsets for k in ks])
        cats = token_categories(doc.text, offsets, language_for(doc.domain))
        row = 0
        for k in ks:
            w = scored[k]
            n = len(w.ids)
            sl = slice(row, row + n)
            row += n
            ids = w.ids.tolist()
            assert w.lp_t is not None and w.lp_h is not None
            loss_t = -np.asarray(w.lp_t, np.float64)
            loss_h = -np.asarray(w.lp_h, np.float64)
            parts.append(pd.DataFrame({
                "window": k, "doc": d, "domain": doc.domain, "pos": np.arange(n),
                "token_id": w.ids, "token": [doc.text[s:e] for s, e in w.offsets],
                "loss_t": loss_t, "loss_h": loss_h, "gap": loss_t - loss_h,
                "word_class": cats.word_class[sl], "word_start": cats.word_start[sl],
                "repeat_n": repeat_lengths(ids), "prev_dist": previous_distance(ids),
                "local_reuse": local_reuse(ids), "bracket": cats.bracket[sl],
                "bracket_kind": cats.bracket_kind[sl],
            }))
    df = pd.concat(parts, ignore_index=True)
    df = df[np.isfinite(df["gap"])].reset_index(drop=True)
    counts = df["token_id"].map(df["token_id"].value_counts())
    df["log_freq"] = np.log(counts / len(df))
    for col in ("domain", "word_class", "bracket", "bracket_kind"):
        df[col] = df[col].astype("category")
    return df
