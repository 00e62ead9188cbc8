"""The prompt probe: features from both models' losses on the prompt (issue #24 item 4)."""

import math

import numpy as np
import pytest

from classifiers.probe import PROBE_FEATURES, probe_features, probe_of_scores


def _pieces(text: str) -> tuple[list[str], list[int]]:
    words = text.split(" ")
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    vocab: dict[str, int] = {}
    return pieces, [vocab.setdefault(p, len(vocab)) for p in pieces]


def test_categories_split_the_gap_where_the_tokens_are():
    # the second copy of a 6-word passage completes repeated 4-grams: give the transformer a
    # low loss exactly there, and the hybrid a low loss on the rest
    pieces, ids = _pieces("the cat sat on the mat ( yes ) and then the cat sat on the mat")
    rep_start = 11  # "the" of the second copy; its 4th word onward completes a repeated 4-gram
    lt = [-1.0 if i >= rep_start + 3 else -3.0 for i in range(len(ids))]
    lh = [-2.0] * len(ids)
    f = probe_features(pieces, ids, lt, lh)
    assert set(f) == set(PROBE_FEATURES)
    assert f["probe_gap_repeat"] == pytest.approx(-1.0)  # T better on the copy
    assert f["probe_gap_new"] == pytest.approx(1.0)  # H better on fresh tokens
    assert 0 < f["probe_repeat_share"] < 0.5
    assert f["probe_gap_close"] == pytest.approx(1.0)  # ")" is fresh here
    assert f["probe_gap"] == pytest.approx(np.mean(np.array(lh) - np.array(lt)))  # loss_t - loss_h


def test_missing_categories_are_nan_and_lengths_must_agree():
    pieces, ids = _pieces("plain words only")
    f = probe_features(pieces, ids, [-1.0] * 3, [-1.5] * 3)
    assert math.isnan(f["probe_gap_repeat"]) and math.isnan(f["probe_gap_close"])
    assert f["probe_gap"] == pytest.approx(-0.5)  # the transformer reads it better
    with pytest.raises(ValueError, match="share a tokenizer"):
        probe_features(pieces, ids, [-1.0] * 3, [-1.0] * 2)
    assert all(math.isnan(v) for v in probe_features([], [], [], []).values())


def test_score_gives_the_prompt_logprobs_of_a_prompt_only_pass(reference_pair):
    t, h = reference_pair
    prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return"
    st, sh = t.score(prompt, " a + b"), h.score(prompt, " a + b")
    assert st.prompt_ids == sh.prompt_ids and len(st.prompt_logprobs) == len(st.prompt_ids)
    # the same numbers as scoring the prompt on its own (causal: the answer never leaks back)
    alone = t.score_ids([[t.prefix_id, *st.prompt_ids]])[0]
    assert np.allclose(alone, st.prompt_logprobs, atol=1e-4)
    f = probe_of_scores(t.tokenizer, st, sh)
    assert f is not None and all(math.isfinite(f[k]) for k in ("probe_gap", "probe_gap_repeat"))
    # the shipped pair's contrast, read from the prompt alone: the second copy of the
    # function is where the transformer reads better than the hybrid
    assert f["probe_gap_repeat"] < f["probe_gap_new"]
