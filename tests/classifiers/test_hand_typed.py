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

from classifiers.labels import label_requests
from classifiers.realdata import read_request_file
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
    assert set(labels.values()) == {"transformer", "hybrid"}, labels


@pytest.mark.parametrize("profile_args", [{"operating_point": "quality"}])
def test_the_shipped_router_follows_the_measured_labels(measured, profile_args):
    reqs, rows = measured
    policy = get_policy("classifier", **profile_args)
    assert not policy.fallback_, "the shipped classifier artifact did not load"
    thr = policy.default_threshold()
    wrong = []
    for req, row in zip(reqs, rows, strict=True):
        score = policy.score(req.routing())
        got = decide(score, thr)
        if got != row["label"]:
            wrong.append(f"{req.id}: measured {row['label']} (gap {row['gap']:+.2f}), "
                         f"routed {got} (score {score:.3f}, threshold {thr:.3f})")
    assert not wrong, "\n".join(wrong)
