"""The saved artifact: round trip, offline load, same predictions as at training."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from classifiers import artifact
from classifiers.features import FEATURE_NAMES
from classifiers.request import RoutingRequest
from classifiers.training.cli import run_train
from classifiers.training.labels import label_requests
from classifiers.training.synthetic_mix import build_mix
from tests.classifiers.fakes import fake_pair, synthetic_docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`archroute train` on labels from the fake pair (no embedding baseline: fast)."""
    tmp = tmp_path_factory.mktemp("art")
    labels = tmp / "labels.jsonl"
    label_requests(build_mix(synthetic_docs(), 300, seed=2), *fake_pair(), cache=labels,
                   progress=False)
    args = argparse.Namespace(labels=str(labels), out=str(tmp / "artifact"),
                              results=str(tmp / "results.json"), models="lightgbm,logistic,rules",
                              margin=None, seed=0, center="0", min_class=20)
    assert run_train(args) == 0
    return tmp


def check_self(clf: artifact.RequestClassifier) -> None:
    reqs = [RoutingRequest.from_prompt(c["prompt"]) for c in clf.meta["self_check"]]
    p = clf.predict_proba(reqs)
    assert p.shape == (len(reqs),)
    np.testing.assert_allclose(p, [c["p_transformer"] for c in clf.meta["self_check"]],
                               rtol=0, atol=1e-9)
    if clf.regressor is not None:
        np.testing.assert_allclose(clf.predict_gap(reqs), [c["gap"] for c in clf.meta["self_check"]],
                                   rtol=0, atol=1e-9)


def test_train_writes_results_and_artifact(trained):
    results = json.loads((trained / "results.json").read_text())
    for name in ("lightgbm (shipped)", "logistic", "rules", "always-transformer", "oracle"):
        assert name in results["models"]
    m = results["models"]["lightgbm (shipped)"]
    assert m["auc"] > 0.7 and 0 <= m["brier"] <= 1 and m["regret"] >= 0
    assert (trained / "results.md").read_text().startswith("| model |")
    meta = json.loads((trained / "artifact" / "meta.json").read_text())
    assert meta["feature_names"] == list(FEATURE_NAMES)
    assert len(meta["training_data"]["sha256"]) == 64 and meta["versions"]["lightgbm"]


def test_artifact_round_trip(trained):
    clf = artifact.load(trained / "artifact")
    check_self(clf)
    one = clf.predict_proba([RoutingRequest.from_prompt("Quote this verbatim: a b c")])
    many = clf.predict_proba([RoutingRequest.from_prompt("Quote this verbatim: a b c")] * 3)
    np.testing.assert_allclose(many, one[0])
    assert clf.predict_proba([]).shape == (0,)


def test_artifact_rejects_other_features(trained, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained / "artifact", bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["feature_names"] = meta["feature_names"][:-1]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(artifact.ArtifactError, match="different features"):
        artifact.load(bad)
    with pytest.raises(artifact.ArtifactError, match="no classifier"):
        artifact.load(tmp_path / "missing")


def test_shipped_default_loads_offline_and_reproduces_training():
    if not (artifact.DEFAULT_DIR / "meta.json").exists():
        pytest.skip("no shipped artifact yet")
    clf = artifact.load_default()
    check_self(clf)
    size = sum(f.stat().st_size for f in artifact.DEFAULT_DIR.iterdir())
    assert size < 5_000_000


def test_degenerate_labels_are_refused_with_advice(trained, tmp_path):
    rows = [json.loads(line) for line in (trained / "labels.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["gap"] = 0.5 + 0.001 * i  # the hybrid wins everything
    labels = tmp_path / "one_sided.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = argparse.Namespace(labels=str(labels), out=str(tmp_path / "a"),
                              results=str(tmp_path / "r.json"), models="lightgbm", margin=None,
                              seed=0, center="0", min_class=20)
    with pytest.raises(SystemExit, match="degenerate labels"):
        run_train(args)
    args.center = "median"
    assert run_train(args) == 0
    assert artifact.load(tmp_path / "a").meta["center"] > 0.5
    # centred: the classifier only ranks, so P(transformer better) comes from the expected
    # gap, and on labels where the hybrid always wins it must say so
    clf = artifact.load(tmp_path / "a")
    reqs = [RoutingRequest.from_prompt(p) for p in ("Quote this verbatim: a b c", "Once upon a time")]
    sigma = clf.meta["label_summary"]["gap_std"]
    expected = [0.5 * (1 + math.erf(-g / (sigma * math.sqrt(2)))) for g in clf.predict_gap(reqs)]
    np.testing.assert_allclose(clf.predict_proba(reqs), expected, rtol=1e-9)
    assert (clf.predict_proba(reqs) < 0.5).all()
