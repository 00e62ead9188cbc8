"""Requests typed by hand, as a new user would: the shipped router sends each to the backend
its label, measured here on the shipped pair, favours.

The requests (tests/classifiers/data/hand_typed.jsonl, written for this test) are the ones a
user tried against the classifier trained on the synthetic mix, which sent all of them to
the hybrid: "Repeat exactly: ...", "Copy the following paragraph word for word: ...", "Fix
the bug in this function and return the whole corrected function", "Extract the email
addresses ... as a JSON list", plus two requests for new text (a poem, advice). The test
measures each label first and asserts on that, not on what the study predicts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from classifiers.training.labels import label_requests
from classifiers.training.realdata import read_request_file
from router.policies import decide, get_policy

DATA = Path(__file__).parent / "data" / "hand_typed.jsonl"


@pytest.fixture(scope="module")
def measured(reference_pair):
    reqs = read_request_file(DATA)
    rows = label_requests(reqs, *reference_pair, progress=False)
    assert len(rows) == len(reqs)
    return reqs, rows


def test_the_hand_typed_requests_have_decisive_labels(measured):
    _, rows = measured
    labels = {r["id"]: r["label"] for r in rows}
    # both backends are represented, so routing everything one way cannot pass the next test
    # (a request measured a tie, |gap| <= 0.05, is in neither test below)
    assert {"transformer", "hybrid"} <= set(labels.values()), labels


def _routed(measured):
    reqs, rows = measured
    policy = get_policy("classifier", operating_point="quality")
    assert not policy.fallback_, "the shipped classifier artifact did not load"
    thr = policy.default_threshold()
    return [(req.id, row["label"], row["gap"], policy.score(req.routing()), thr)
            for req, row in zip(reqs, rows, strict=True)]


def _wrong(routed, label: str) -> list[str]:
    return [f"{rid}: measured {lab} (gap {gap:+.2f}), routed {decide(score, thr)} "
            f"(score {score:.3f}, threshold {thr:.3f})"
            for rid, lab, gap, score, thr in routed if lab == label and decide(score, thr) != lab]


def test_transformer_favoured_requests_go_to_the_transformer(measured):
    """The issue's four (repeat, copy, fix, extract): measured transformer-favoured, routed
    to the transformer at the shipped quality threshold."""
    assert not _wrong(_routed(measured), "transformer")


def test_scores_rank_the_measured_labels(measured):
    """Every hybrid-favoured request scores below every transformer-favoured one, so a
    router that sends everything one way cannot pass."""
    routed = _routed(measured)
    t = [s for _, lab, _, s, _ in routed if lab == "transformer"]
    h = [s for _, lab, _, s, _ in routed if lab == "hybrid"]
    assert t and h and max(h) < min(t), routed


@pytest.mark.xfail(strict=True, reason=(
    "the shipped quality threshold is the robust one (no source's leave-one-source-out "
    "regret above 0.03), 0.343 on the phase-8 pair's classifier: it sends the advice "
    "request (score 0.393, measured hybrid +0.32) to the transformer; at the expected-gap "
    "threshold, 0.5, it goes to the hybrid (phase-6 pair: 0.346, 0.386, +0.26; raw-text "
    "pair: 0.447, 0.465, +0.41)"))
def test_hybrid_favoured_requests_go_to_the_hybrid(measured):
    assert not _wrong(_routed(measured), "hybrid")
