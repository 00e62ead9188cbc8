"""Off-policy evaluation and retraining from a decision log (``archroute eval --from-log``,
``archroute train --from-log``), on logs written through :class:`DecisionLog` whose truth is
known: every request has both backends' losses, the logging router explored."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from classifiers import artifact
from evals.from_log import LogEvalError, eligible, evaluate
from evals.from_log import run as run_from_log
from router.decision_log import DecisionLog, DecisionRow, read_log
from router.learning.retrain import run_train

COPY_ASK = "Repeat the following text exactly: {}"  # the classifier reads it as a copy (gap < 0)
NEW_ASK = "Write a short poem about {}."
WORDS = ["sea", "moon", "river", "stone", "forest", "winter", "garden", "bridge", "tower",
         "candle", "harbor", "meadow"]


def write_log(path: Path, n: int = 240, eps: float = 0.3, seed: int = 0, prompts: bool = True,
              labels: bool = True, feedback: bool = False) -> DecisionLog:
    """A log from a router that sends copy requests to the transformer and the rest to the
    hybrid, exploring ``eps``; copying is cheaper on the transformer (0.3 vs 1.0 nats/token),
    new text on the hybrid (1.0 vs 1.6)."""
    rng = np.random.default_rng(seed)
    dlog = DecisionLog(path, log_prompts=prompts, retention_days=None)
    outcomes = []
    for i in range(n):
        copy = i % 2 == 0
        w = f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} {i}"
        text = (COPY_ASK if copy else NEW_ASK).format(w)
        choice = "transformer" if copy else "hybrid"
        explored = bool(rng.random() < eps)
        action = ({"transformer": "hybrid", "hybrid": "transformer"}[choice] if explored
                  else choice)
        lt, lh = (0.3, 1.0) if copy else (1.6, 1.0)
        lt, lh = lt + rng.normal(0, 0.05), lh + rng.normal(0, 0.05)
        rid = f"chatcmpl-{i}"
        dlog.write(DecisionRow(rid, "chat", "archroute", profile="p", policy="rules",
                               score=0.8 if copy else 0.2, threshold=0.5, decision=action,
                               backend=f"{action}-b", propensity=eps if explored else 1 - eps,
                               explored=explored, prompt=text,
                               request={"kind": "chat", "max_tokens": None,
                                        "messages": [{"role": "user", "content": text}]}))
        outcomes.append((rid, lt, lh, lt if action == "transformer" else lh))
    dlog.flush()
    for rid, lt, lh, loss in outcomes:
        if labels:
            dlog.add_reference(rid, "ref", "sha")
            dlog.set_label(rid, "done", lt, lh, lt - lh, 5, "t|h")
        if feedback:
            dlog.add_feedback(rid, float(np.clip(1.0 - loss, -1, 1)), "reward")
    # rows every estimate must leave out
    dlog.write(DecisionRow("fallback", "chat", "archroute", profile="p", policy="rules",
                           decision="transformer", backend="hybrid-b", fallback_from="t",
                           propensity=0.7, explored=False, prompt="x"))
    dlog.write(DecisionRow("direct", "chat", "t", decision="transformer", backend="t",
                           propensity=1.0, explored=False, prompt="x"))
    dlog.write(DecisionRow("side", "chat", "archroute", profile="p", policy="side-request",
                           decision="hybrid", backend="h", side=True, propensity=1.0,
                           explored=False, prompt="### Task: title"))
    dlog.write(DecisionRow("old", "chat", "archroute", profile="p", policy="rules",
                           decision="hybrid", backend="h", prompt="x"))
    dlog.write(DecisionRow("failed", "chat", "archroute", profile="p", policy="rules",
                           decision="hybrid", status=502, propensity=0.7, prompt="x"))
    dlog.close()
    return dlog


def test_eligible_rows_and_what_is_left_out(tmp_path: Path) -> None:
    write_log(tmp_path / "d.sqlite", n=20)
    data = eligible(read_log(tmp_path / "d.sqlite"))
    assert data.reward_kind == "loss" and len(data.rows) == 20
    assert dict(data.left_out) == {
        "fallback (the reward is the other backend's)": 1,
        "not routed by a policy (backend named, span, side request)": 2,
        "no propensity (logged before propensities)": 1, "not served (error)": 1}
    explored = np.array([bool(r["explored"]) for r in data.rows])
    assert (data.logged_choice == np.where(explored, 1 - data.action, data.action)).all()
    assert data.requests[0].kind == "chat" and data.requests[0].last_user.startswith("Repeat")


def test_estimates_hold_the_known_value(tmp_path: Path) -> None:
    write_log(tmp_path / "d.sqlite")
    rows = read_log(tmp_path / "d.sqlite")
    res = evaluate(rows, policy="rules", n_boot=500)
    t = res["targets"]
    assert res["n_used"] == 240 and res["reward"] == "loss"
    for name in ("always-transformer", "always-hybrid", "logging router, without exploration"):
        truth = t[name]["labelled_value"]
        for k in ("ips", "snips", "dr"):
            e = t[name]["estimates"][k]
            assert e["ci"][0] <= truth <= e["ci"][1], (name, k, e, truth)
    # the logging router's own choice is the best of the three, as constructed
    assert t["logging router, without exploration"]["labelled_value"] > max(
        t["always-transformer"]["labelled_value"], t["always-hybrid"]["labelled_value"])
    assert res["direct_model"]["k"] > 0  # the shipped gap regressor, fitted on the rewards


def test_feedback_rewards(tmp_path: Path) -> None:
    write_log(tmp_path / "d.sqlite", feedback=True)
    res = evaluate(read_log(tmp_path / "d.sqlite"), policy="rules", n_boot=200)
    assert res["reward"] == "feedback" and res["n_used"] == 240
    assert "labelled_value" not in res["targets"]["always-hybrid"]
    loss = evaluate(read_log(tmp_path / "d.sqlite"), policy="rules", reward="loss", n_boot=0)
    assert loss["reward"] == "loss"


def test_without_prompts_it_says_what_to_do(tmp_path: Path, capsys) -> None:
    write_log(tmp_path / "d.sqlite", n=10, prompts=False)
    with pytest.raises(LogEvalError, match="log_prompts"):
        evaluate(read_log(tmp_path / "d.sqlite"))
    assert run_from_log(str(tmp_path / "d.sqlite")) == 2
    assert "--log-prompts" in capsys.readouterr().err
    assert run_from_log(str(tmp_path / "missing.sqlite")) == 2
    assert "no decision log" in capsys.readouterr().err


def test_the_cli_prints_the_table(tmp_path: Path, capsys) -> None:
    from router.cli import main

    write_log(tmp_path / "d.sqlite", n=60)
    assert main(["eval", "--from-log", str(tmp_path / "d.sqlite"), "--policy", "rules",
                 "--threshold", "0.5", "--bootstrap", "100", "--json",
                 str(tmp_path / "o.json")]) == 0
    out = capsys.readouterr().out
    assert "| rules (threshold 0.500) |" in out and "labelled value" in out
    assert (tmp_path / "o.json").exists()


def train_args(db: Path, out: Path | None, labels: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(from_log=str(db), out=None if out is None else str(out),
                              labels=labels, seed=0)


def log_counts(printed: str) -> tuple[int, int]:
    """(requests trained on, requests held back for the reload gate) as train prints them."""
    import re

    m = re.search(r"(\d+) labelled requests from the log \(left out: (\d+) held back", printed)
    assert m, printed
    return int(m.group(1)), int(m.group(2))


def test_train_from_log_fits_and_self_checks(tmp_path: Path, capsys) -> None:
    write_log(tmp_path / "d.sqlite", n=120)
    out = tmp_path / "art"
    assert run_train(train_args(tmp_path / "d.sqlite", out)) == 0
    printed = capsys.readouterr().out
    n, held = log_counts(printed)
    assert n + held == 120 and 0 < held < 60 and "self-check passed" in printed
    clf = artifact.load(out, verify=True, strict=True)
    assert clf.meta["training_data"]["n_from_log"] == n  # the reload gate's rows held back
    assert set(clf.thresholds) >= {"quality", "cost", "risk-0.1"}
    from classifiers.request import RoutingRequest

    p = clf.predict_proba([RoutingRequest.from_messages([{"role": "user", "content": t}])
                           for t in (COPY_ASK.format("lamp post 999"),
                                     NEW_ASK.format("lamp post 999"))])
    assert p[0] > clf.thresholds["quality"] > p[1]  # learned from the log


def test_train_from_log_says_why_it_cannot(tmp_path: Path) -> None:
    write_log(tmp_path / "d.sqlite", n=10, labels=False, feedback=True)
    with pytest.raises(SystemExit, match="no scored references"):
        run_train(train_args(tmp_path / "d.sqlite", tmp_path / "art"))
    with pytest.raises(SystemExit, match="--out"):
        run_train(train_args(tmp_path / "d.sqlite", None))
    write_log(tmp_path / "few.sqlite", n=8)
    with pytest.raises(SystemExit, match="too few labels"):
        run_train(train_args(tmp_path / "few.sqlite", tmp_path / "art"))


def label_file(path: Path, n: int = 80) -> Path:
    """Real-request label rows (the shape `archroute label --requests` writes), two sources."""
    import json

    lines = []
    for i in range(n):
        copy = i % 2 == 0
        text = (COPY_ASK if copy else NEW_ASK).format(f"{WORDS[i % len(WORDS)]} {i}")
        lt, lh = (0.3, 1.0) if copy else (1.6, 1.0)
        lines.append(json.dumps({"id": f"r{i}", "group": f"src{i % 2}", "source": "s",
                                 "kind": "copy" if copy else "new",
                                 "messages": [{"role": "user", "content": text}],
                                 "reference": "x", "key": f"r{i}:k", "pair": "t|h", "fp": "f",
                                 "gap": lt - lh, "loss_transformer": lt, "loss_hybrid": lh,
                                 "n_tokens": 3, "label": "x"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_quick_train_on_a_label_file_and_with_a_log(tmp_path: Path, capsys) -> None:
    labels = label_file(tmp_path / "real.jsonl")
    args = argparse.Namespace(labels=str(labels), out=str(tmp_path / "q"), results="unused",
                              models="lightgbm", margin=None, seed=0, center="0", min_class=20,
                              requests=None, variants="shipped", mix_labels=None, plots=None,
                              quick=True, from_log=None)
    assert run_train(args) == 0
    assert "80 labelled requests" in capsys.readouterr().out
    assert artifact.load(tmp_path / "q", strict=True).meta["training_data"]["kind"] == "quick fit"
    write_log(tmp_path / "d.sqlite", n=40)
    assert run_train(train_args(tmp_path / "d.sqlite", tmp_path / "both", str(labels))) == 0
    out = capsys.readouterr().out
    n, held = log_counts(out)
    assert n + held == 40 and "held back for the reload gate), 80 from" in out
    assert f"{n + 80} labelled requests" in out
