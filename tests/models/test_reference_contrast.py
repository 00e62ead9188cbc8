"""The shipped reference pair shows the contrast ArchRoute is built on (issue 7): the
transformer copies a passage it has seen earlier in the context, the hybrid barely does,
and on text seen for the first time the hybrid predicts better.

A small version of the model card's copy probe, on text that ships with Python (the
standard library's own sources, the pair's code domain), so it runs on a clean clone
without the corpus. The model card's probe (held-out passages, 48 items a cell, bootstrap
CIs) is the measurement; this test guards the shipped weights against a regression."""

import inspect
import json
import textwrap

import numpy as np
import pytest

from models.reference_pair import load_reference_pair

MODULES = (json.decoder, textwrap, inspect)


@pytest.fixture(scope="module")
def pair():
    return load_reference_pair()


def _items(tok, length: int = 64, filler: int = 64) -> list[tuple[list[int], int, int]]:
    """(ids, start of the first occurrence, start of the second) per probe item: lead, a
    passage of ``length`` tokens, ``filler`` tokens of other text, the passage again."""
    items = []
    for i, mod in enumerate(MODULES):
        ids = tok(inspect.getsource(mod), add_special_tokens=False)["input_ids"]
        other = tok(inspect.getsource(MODULES[(i + 1) % len(MODULES)]),
                    add_special_tokens=False)["input_ids"]
        for start in (200, 900):
            lead, passage = ids[start - 32:start], ids[start:start + length]
            fill = other[start:start + filler]
            seq = lead + passage + fill + passage
            items.append((seq, len(lead), len(lead) + length + filler))
    return items


def _occurrence_losses(backend, items, length: int = 64) -> np.ndarray:
    """Mean loss on (first, second) occurrence per item, each occurrence's first token
    excluded (it cannot be predicted from the repeat)."""
    lps = backend.score_ids([seq for seq, _, _ in items])
    out = []
    for lp, (_, a0, b0) in zip(lps, items, strict=True):
        # lp[j] = log p(token j+1 | tokens <= j)
        out.append((-lp[a0:a0 + length - 1].mean(), -lp[b0:b0 + length - 1].mean()))
    return np.asarray(out)


def test_transformer_copies_the_hybrid_does_not_and_the_hybrid_leads_on_fresh_text(pair):
    t, h = pair
    items = _items(t.tokenizer)
    assert t.tokenizer.get_vocab() == h.tokenizer.get_vocab()
    lt, lh = _occurrence_losses(t, items), _occurrence_losses(h, items)
    # exact recall: the transformer's second occurrence is far cheaper than its first
    assert (lt[:, 1] < lt[:, 0] - 0.5).all(), lt
    # and cheaper than the hybrid's second occurrence: on every item, by a wide margin on
    # average (measured at shipping: 1.46 nats; the step-600 snapshot fails all of this)
    assert (lt[:, 1] < lh[:, 1]).all(), (lt, lh)
    assert (lh[:, 1] - lt[:, 1]).mean() > 0.8, (lt, lh)
    # the hybrid gains far less from the repeat than the transformer does
    assert (lh[:, 0] - lh[:, 1]).mean() < 0.5 * (lt[:, 0] - lt[:, 1]).mean()
    # on the first occurrence (nothing to copy) the hybrid is ahead on average
    assert lh[:, 0].mean() < lt[:, 0].mean()
