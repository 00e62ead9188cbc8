"""``archroute train --probe`` (issue #24 item 4): the probe's columns by name, and a clear
error for labels that do not carry the probe."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from classifiers.probe import PROBE_FEATURES
from classifiers.training.cli import add_train
from tests.router.probe_fixtures import fake_probe_rows


def run_train(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    add_train(parser.add_subparsers())
    args = parser.parse_args(["train", *argv])
    args.func(args)


def test_rows_without_the_probe_name_archroute_label(tmp_path: Path) -> None:
    rows = fake_probe_rows(40)
    del rows[3]["probe"]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit) as info:
        run_train("--probe", "--labels", str(labels), "--out", str(tmp_path / "out"))
    msg = str(info.value)
    assert msg.startswith("archroute train --probe: 1 of 40 label rows carry no prompt probe")
    assert "fake-3" in msg and "`archroute label`" in msg
    assert not (tmp_path / "out").exists()


def test_synthetic_mix_labels_are_refused(tmp_path: Path) -> None:
    labels = tmp_path / "mix.jsonl"
    labels.write_text(json.dumps({"prompt": "x", "gap": 0.1, "key": "k"}) + "\n")
    with pytest.raises(SystemExit, match="labels of the synthetic mix"):
        run_train("--probe", "--labels", str(labels), "--out", str(tmp_path / "out"))


def test_the_artifact_names_the_probe_columns(tmp_path: Path) -> None:
    rows = fake_probe_rows(80)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_train("--probe", "--labels", str(labels), "--out", str(tmp_path / "out"))
    names = json.loads((tmp_path / "out" / "meta.json").read_text())["feature_names"]
    assert names[-1] == "text_logit" and tuple(names[-1 - len(PROBE_FEATURES):-1]) == PROBE_FEATURES
