"""Request features on hand-made prompts, and garbage input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from classifiers import features as F
from classifiers.request import RoutingRequest
from models.base import ChatMessage


def feats(prompt: str, **kw) -> dict[str, float]:
    v = F.extract(RoutingRequest.from_prompt(prompt, **kw))
    assert v.shape == (len(F.FEATURES),)
    assert np.isfinite(v).all()
    return dict(zip(F.FEATURE_NAMES, v.tolist(), strict=True))


def test_features_are_named_and_documented_once():
    assert len(set(F.FEATURE_NAMES)) == len(F.FEATURES)
    for f in F.FEATURES:
        assert f.name and f.meaning and f.why
        assert f.group in {"length", "repetition", "structure", "semantics", "cue", "task"}


def test_code_block_with_unclosed_bracket():
    f = feats("Fix this code:\n```python\ndef total(items):\n    return sum([x.price for x in (items\n```\n")
    assert f["fenced_blocks"] == 1
    assert f["block_python"] == 1 and f["ts_parsed"] == 1
    assert f["ts_error_nodes"] + f["ts_missing_nodes"] >= 1
    assert f["bracket_end_depth"] == 3  # sum( [ ( still open
    assert f["edit_cue"] >= 1
    assert f["ts_end_depth"] >= 2


def test_balanced_code_parses_clean():
    f = feats("```python\ndef f(x):\n    return [x, (x + 1)]\n```\n")
    assert f["ts_parsed"] == 1 and f["ts_error_nodes"] == 0 and f["ts_missing_nodes"] == 0
    assert f["bracket_end_depth"] == 0 and f["bracket_max_depth"] == 2


def test_quote_this_request():
    passage = "The committee met on Tuesday and agreed on the budget for the new library. " * 3
    f = feats(f"Quote the following passage verbatim:\n\n{passage}")
    assert f["copy_cue"] >= 2  # "quote", "verbatim"
    assert f["explain_cue"] == 0
    assert f["longest_repeat_log"] >= math.log2(64)
    assert f["rep_share_32"] > 0.5


def test_narrative():
    story = ("She walked slowly to the harbor because her brother had promised to meet her "
             "there. When he finally arrived, they laughed about the storm and he told her "
             "why the ship was late. Why did it matter? It mattered to them.")
    f = feats(story)
    assert f["copy_cue"] == 0 and f["edit_cue"] == 0
    assert f["ts_parsed"] == 0 and f["fenced_blocks"] == 0
    assert f["pronoun_share"] > 0.1
    assert 0.3 < f["content_word_share"] < 0.8
    assert f["question_share"] > 0 and f["adverb_share"] > 0 and f["there_share"] > 0
    assert f["type_token_ratio"] > 0.6
    assert f["longest_repeat_log"] <= math.log2(16)


def test_tail_repeat_sees_a_copy_in_progress():
    passage = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi"
    f = feats(f"{passage}\n\nsome other words in between here\n\n{passage[:40]}")
    assert f["tail_repeat_log"] >= math.log2(32)
    assert f["tail_repeat_dist_log"] > 0
    g = feats("no earlier copy of this tail exists anywhere at all in this prompt: xyz")
    assert g["tail_repeat_log"] <= 2


def test_markup_markers_and_unclosed_structure():
    f = feats('<div class="a"><ul><li><a href="x.html">one</a></li><li>two')
    assert f["tags_unclosed"] >= 3 and f["lang_html"] > 0 and f["angle_density"] > 0.1
    g = feats("\\begin{document}\n\\begin{itemize}\n\\item one\n\\end{itemize}\n")
    assert g["latex_env_unclosed"] == 1 and g["lang_latex"] > 0
    j = feats('```json\n{"a": [1, 2], "b": {"c": null\n```')
    assert j["block_json"] == 1 and j["bracket_end_depth"] == 2


def test_length_features():
    f = feats("hello world", max_tokens=100)
    assert f["has_max_tokens"] == 1 and f["max_tokens_log"] == pytest.approx(math.log1p(100))
    assert f["chars_log"] == pytest.approx(math.log1p(11)) and f["turns"] == 1
    assert feats("hello")["has_max_tokens"] == 0


def test_multi_turn_weights_the_last_user_turn():
    msgs = (ChatMessage("system", "You are helpful."),
            ChatMessage("user", "Tell me a story about a lighthouse keeper."),
            ChatMessage("assistant", "Once there was a keeper who loved the sea."),
            ChatMessage("user", "Now quote your story verbatim."))
    v = dict(zip(F.FEATURE_NAMES, F.extract(RoutingRequest(msgs)).tolist(), strict=True))
    assert v["turns"] == 4
    assert v["copy_cue"] == pytest.approx(F.LAST_USER_WEIGHT * 2)  # "quote", "verbatim"
    assert 0 < v["last_user_share"] < 0.5


GARBAGE = [
    "",
    " ",
    "\x00\x01\x02" * 300,
    bytes(range(256)).decode("latin-1") * 20,
    "\ud800\udfff lone surrogates",
    "a" * 1_000_000,
    "(" * 50_000,
    ")]}" * 10_000,
    "```python\ndef broken(:\n  return ((( [[[ {{{\n",
    "```\n" * 1000,
    "<" * 5000 + "</" * 5000,
    "\\begin{" * 3000,
    "😀" * 10_000,
    "\n" * 20_000,
]


@pytest.mark.parametrize("text", GARBAGE, ids=lambda t: repr(t[:12]))
def test_garbage_gives_finite_features(text):
    feats(text)


def test_garbage_conversations():
    for msgs in [(), (ChatMessage("assistant", "only an assistant turn"),),
                 (ChatMessage("user", ""), ChatMessage("user", ""))]:
        v = F.extract(RoutingRequest(msgs))
        assert np.isfinite(v).all()


def test_extract_batch():
    X = F.extract_batch([RoutingRequest.from_prompt(p) for p in ["a", "b c", "def f():"]])
    assert X.shape == (3, len(F.FEATURES))
    assert F.extract_batch([]).shape == (0, len(F.FEATURES))


def test_cues_match_whole_words_with_inflections():
    f = feats("The first edition carries a copyright notice.")
    assert f["copy_cue"] == 0 and f["edit_cue"] == 0
    f = feats("He quoted it and repeats it; then I edited it.")
    assert f["copy_cue"] == 2 and f["edit_cue"] == 1


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Fix the bug:\n\n```python\ndef f(x):\n    return x +\n```"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Shorten your answer."}],
    [{"role": "user", "content": ""}],
])
def test_features_are_computed_by_name(messages) -> None:
    """Every value is produced under its declared name (no positional matching), and the
    vector is the named values in FEATURE_NAMES order."""
    from classifiers.features import FEATURE_NAMES, TASK_NAMES, extract, extract_task, named

    req = RoutingRequest.from_messages(messages)
    values = named(req)
    assert list(values) != [] and set(values) == set(FEATURE_NAMES)
    assert len(values) == len(FEATURE_NAMES)
    assert extract(req).tolist() == [values[n] for n in FEATURE_NAMES]
    assert extract_task(req).tolist() == [values[n] for n in TASK_NAMES]
