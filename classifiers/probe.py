"""The prompt probe (issue #24 item 4): features from both models' own loss on the prompt.

Each backend reads the prompt once (a prefill) and gives log p(prompt[i] | prompt[:i]) for
every prompt token. Where the transformer reads the prompt better than the hybrid, it tends
to be the better model for the answer too: on held-out real requests the untrained gap ranks
requests at AUC 0.60 pooled (issue #24). The level is not calibrated across sources, so the
features are meant for learning within the user's own traffic (the learning loop), beside
the prompt-only request features, not as a rule that transfers.

Features, by the study's token categories (:mod:`classifiers.categories`), each the mean
of ``loss_transformer - loss_hybrid`` (nats/token; negative: the transformer reads it
better) over the prompt tokens of that category, NaN when the prompt has none:

- ``probe_gap``: every prompt token; ``probe_loss_t`` / ``probe_loss_h`` the two levels;
- ``probe_gap_repeat``: tokens completing a repeated 4+-gram of the prompt (the copy signal),
  ``probe_gap_new``: tokens that complete no repeated bigram; ``probe_repeat_share``;
- ``probe_gap_close``: closing brackets;
- ``probe_gap_content`` / ``probe_gap_function``: content and function words (starts of
  words only: the study's open-class vs closed-class contrast);
- ``probe_gap_tail``: the last 32 prompt tokens (the end of the request and the chat
  template's answer cue, nearest to what the answer will look like).

Both models must share a tokenizer (the pair the router spans over does), so the two
log-probability arrays align token by token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from classifiers.categories import repeat_lengths, token_categories

PROBE_FEATURES: tuple[str, ...] = (
    "probe_loss_t", "probe_loss_h", "probe_gap", "probe_gap_repeat", "probe_gap_new",
    "probe_repeat_share", "probe_gap_close", "probe_gap_content", "probe_gap_function",
    "probe_gap_tail",
)
TAIL = 32  # tokens at the end of the prompt for probe_gap_tail
REPEAT_N = 4  # a token completing a repeated n-gram of at least this length is a copy token


def _mean(x: np.ndarray, mask: np.ndarray | None = None) -> float:
    v = x if mask is None else x[mask]
    return float(v.mean()) if v.size else float("nan")


def probe_features(pieces: Sequence[str], ids: Sequence[int], logprobs_t: Sequence[float],
                   logprobs_h: Sequence[float], lang: str = "prose") -> dict[str, float]:
    """The probe features of one prompt.

    ``ids`` are the prompt's token ids and ``pieces`` their decoded texts (one string per
    token), ``logprobs_t`` / ``logprobs_h`` each model's log p of every prompt token given the
    ones before it (:attr:`models.base.ScoreResult.prompt_logprobs`). Raises ``ValueError``
    when the lengths differ (the two models did not read the same tokens).
    """
    n = len(ids)
    if not (len(pieces) == len(logprobs_t) == len(logprobs_h) == n):
        raise ValueError(f"probe: {n} ids, {len(pieces)} pieces, {len(logprobs_t)} and "
                         f"{len(logprobs_h)} log-probabilities (do the models share a tokenizer?)")
    if n == 0:
        return dict.fromkeys(PROBE_FEATURES, float("nan"))
    lt = -np.asarray(logprobs_t, dtype=np.float64)
    lh = -np.asarray(logprobs_h, dtype=np.float64)
    gap = lt - lh
    rep = repeat_lengths(list(ids))
    text = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    offsets = np.stack([ends - [len(p) for p in pieces], ends], axis=1)
    cats = token_categories(text, offsets, lang)
    wc = cats.word_class
    starts = cats.word_start
    return {
        "probe_loss_t": _mean(lt), "probe_loss_h": _mean(lh), "probe_gap": _mean(gap),
        "probe_gap_repeat": _mean(gap, rep >= REPEAT_N),
        "probe_gap_new": _mean(gap, rep < 2),
        "probe_repeat_share": float((rep >= REPEAT_N).mean()),
        "probe_gap_close": _mean(gap, cats.bracket == "close"),
        "probe_gap_content": _mean(gap, (wc == "content") & starts),
        "probe_gap_function": _mean(gap, (wc == "function") & starts),
        "probe_gap_tail": _mean(gap[-TAIL:]),
    }


def probe_of_scores(tokenizer, t, h) -> dict[str, float] | None:
    """Probe features from two :class:`~models.base.ScoreResult` of the same prompt (one per
    model), or None when either lacks prompt log-probabilities or they read different
    tokens. ``tokenizer`` (a Hugging Face tokenizer) decodes each token."""
    if t.prompt_logprobs is None or h.prompt_logprobs is None or t.prompt_ids != h.prompt_ids:
        return None
    ids = list(t.prompt_ids or [])
    pieces = [tokenizer.decode([i]) for i in ids]
    return probe_features(pieces, ids, t.prompt_logprobs, h.prompt_logprobs)
