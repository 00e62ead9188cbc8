"""Smoke test of `archroute bench classifier` (runs it small; timings are not asserted)."""

from __future__ import annotations

import argparse

import numpy as np

from classifiers import artifact
from classifiers.features import FEATURE_NAMES
from classifiers.training.estimators import LightGBMRouter
from evals.bench import classifier_latency


def test_bench_prints_a_row_per_length(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, len(FEATURE_NAMES)))
    router = LightGBMRouter(n_estimators=5).fit(X, (X[:, 0] > 0).astype(int))
    artifact.save(tmp_path / "art", router)
    p = argparse.ArgumentParser()
    classifier_latency.add_arguments(p)
    args = p.parse_args(["--artifact", str(tmp_path / "art"), "--lengths", "64,256",
                         "--repeats", "3", "--no-embedding", "--corpus", str(tmp_path / "none")])
    assert classifier_latency.run(args) == 0
    out = capsys.readouterr().out
    assert "| 64 | 256 |" in out and "| 256 | 1024 |" in out


def test_bench_text_has_the_requested_length(tmp_path):
    assert len(classifier_latency.bench_text(5000, str(tmp_path / "none"))) == 5000
