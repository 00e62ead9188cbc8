"""The request mix and the labeller, on a synthetic corpus and a fake backend pair."""

from __future__ import annotations

import collections

import pytest

from classifiers.training.labels import (
    MARGIN,
    gap_of,
    label_class,
    label_requests,
    read_labels,
    summarize,
)
from classifiers.training.synthetic_mix import KIND_SHARES, build_mix, doc_split
from models.base import ScoreResult
from tests.classifiers.fakes import fake_pair, synthetic_docs


@pytest.fixture(scope="module")
def mix():
    return build_mix(synthetic_docs(), 240, seed=0)


def test_mix_has_every_kind_and_disjoint_documents(mix):
    assert len(mix) == 240
    kinds = collections.Counter(r.kind for r in mix)
    assert set(kinds) == set(KIND_SHARES)
    splits = collections.defaultdict(set)
    for r in mix:
        splits[r.doc_id].add(r.split)
        assert r.split == doc_split(r.doc_id)
        assert r.prompt and r.answer.strip()
        assert len(r.prompt) <= 2200 and len(r.answer) <= 400
    assert all(len(s) == 1 for s in splits.values())
    assert {r.split for r in mix} == {"train", "test"}


def test_copy_requests_answer_with_a_span_of_the_prompt(mix):
    for r in mix:
        if r.kind in ("quote", "extract"):
            assert r.answer in r.prompt


def test_mix_is_deterministic():
    docs = synthetic_docs(4)
    assert build_mix(docs, 30, seed=3) == build_mix(docs, 30, seed=3)


def test_gap_and_class():
    t = ScoreResult(["a", "b"], [-1.0, -3.0])
    h = ScoreResult(["a", "b"], [-2.0, -1.0])
    assert gap_of(t, h) == pytest.approx(0.5)  # loss_t 2.0 - loss_h 1.5
    assert label_class(0.2) == "hybrid" and label_class(-0.2) == "transformer"
    assert label_class(MARGIN / 2) == "tie" and label_class(float("nan")) == "tie"
    assert gap_of(ScoreResult([], []), h) != gap_of(ScoreResult([], []), h)  # nan


def test_labels_follow_the_pair_and_are_cached(mix, tmp_path):
    t, h = fake_pair()
    cache = tmp_path / "labels.jsonl"
    rows = label_requests(mix[:80], t, h, cache=cache, progress=False)
    assert len(rows) == 80 and len(read_labels(cache)) == 80
    quotes = [r["gap"] for r in rows if r["kind"] in ("quote", "extract")]
    assert quotes and max(quotes) < -MARGIN  # copies: the transformer wins
    s = summarize(rows)
    assert s["n"] == 80 and 0 <= s["hybrid_wins"] <= 1

    calls = []

    class Boom(type(t)):  # label_requests isolates failures, so count calls instead
        def score_batch(self, pairs):
            calls.append(len(pairs))
            raise AssertionError("cached rows must not be rescored")

    again = label_requests(mix[:80], Boom("fake-transformer", -0.3, -2.2),
                           Boom("fake-hybrid", -0.9, -1.9), cache=cache, progress=False)
    assert [r["gap"] for r in again] == [r["gap"] for r in rows]
    assert calls == []


def test_a_refused_request_is_skipped_not_fatal(mix):
    t, h = fake_pair()

    class Picky(type(h)):
        def score_batch(self, pairs):
            if any("Quote" in p for p, _ in pairs):
                raise ValueError("refused")
            return super().score_batch(pairs)

    picky = Picky("picky-hybrid", -0.9, -1.9)
    rows = label_requests(mix[:60], t, picky, progress=False, chunk_size=8)
    n_quote = sum("Quote" in r.prompt for r in mix[:60])
    assert n_quote and len(rows) == 60 - n_quote


@pytest.mark.slow
def test_labels_on_the_reference_pair(reference_pair, mix):
    """The real pair scores the mix's answers: finite gaps over the answer tokens."""
    t, h = reference_pair
    rows = label_requests(mix[:4], t, h, progress=False)
    assert len(rows) == 4
    for r in rows:
        assert r["n_tokens"] > 0 and r["gap"] == r["gap"]
        assert r["gap"] == pytest.approx(r["loss_transformer"] - r["loss_hybrid"], abs=1e-5)
