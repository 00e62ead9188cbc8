"""``archroute eval --simulate-shift`` (evals/shift.py, #24): a source whose pattern is the
reverse of the training sources' arrives; the loop (guard, gate, warm-started refit) must
bring it within the issue's bars, through the real CLI, with its table, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.cli import main

COPY = ("Repeat the following sentence exactly: {s}", "Extract the name in the text below.\n\n{s}",
        "Rewrite this sentence in the passive voice: {s}")
OPEN = ("Write a short poem about {t}.", "Explain why {t} matters to people, in your own words.",
        "Give me some ideas for a weekend trip to {t}.")
SENT = ("The river rose slowly through the night and flooded the lower fields.",
        "Maria Lopez opened the bakery on Elm Street in 1998 with her brother.")
TOPICS = ("the sea", "winter mornings", "old libraries", "mountain towns")


def label_rows(spec: dict, seed: int = 0, noise: float = 0.3) -> list[dict]:
    """{source: (n, copy share, mean gap of copy requests, of open ones)} -> label rows."""
    rng = np.random.default_rng(seed)
    out = []
    for g, (n, share, gc, go) in spec.items():
        for i in range(n):
            copy = bool(rng.random() < share)
            text = (COPY if copy else OPEN)[int(rng.integers(3))].format(
                s=SENT[int(rng.integers(2))], t=TOPICS[int(rng.integers(4))])
            gap = (gc if copy else go) + rng.normal(0, noise)
            lh = 1.2 + rng.random()
            out.append({"key": f"{g}:{i}", "id": f"{g}-{i:05d}", "group": g, "kind": "x",
                        "pair": "fake", "messages": [{"role": "user", "content": text}],
                        "gap": float(gap), "loss_transformer": float(lh + gap),
                        "loss_hybrid": float(lh)})
    return out


@pytest.mark.slow
def test_simulate_shift_learns_a_reversed_source_within_the_bars(tmp_path: Path, capsys) -> None:
    labels = tmp_path / "labels.jsonl"
    rows = label_rows({"a": (400, 0.7, -0.3, 0.2), "b": (400, 0.6, -0.3, 0.2),
                       "new": (800, 0.5, 0.25, -0.2)})  # the new source: the reverse
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shift"
    rc = main(["eval", "--simulate-shift", "--labels", str(labels), "--sources", "new",
               "--retrain-every", "100", "--bootstrap", "100", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    res = json.loads((out / "shift.json").read_text())["results"][0]
    ev = {e["labels"]: e for e in res["evaluations"]}
    assert ev[0]["regret"] > 0.05  # the base, trained on the others, is wrong here
    after = [e for n, e in ev.items() if n >= 100]
    assert after and max(e["regret"] for e in after) <= 0.05
    assert ev[300]["regret"] <= 0.03 and ev[300]["ogr"] >= 0.3
    assert res["counters"].get("promoted", 0) >= 1
    assert all(h["event"] != "promoted" or h["gate"]["ci"][0] > 0 for h in res["history"])
    assert "PASS: within 0.03 after <= 300 labels" in text
    assert (out / "shift.png").stat().st_size > 0 and (out / "shift.md").is_file()


def test_simulate_shift_bad_input_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in label_rows({"a": (30, .5, 0, 0),
                                                                         "b": (30, .5, 0, 0)})))
    for extra, words in ((["--epsilon", "0.7"], "[0, 0.5]"), (["--sources", "zz"], "no labels"),
                         (["--retrain-every", "0"], "at least 1"),
                         (["--sources", "selfinstruct_user_eval"], "evaluation only")):
        rc = main(["eval", "--simulate-shift", "--labels", str(labels), *extra])
        assert rc == 2 and words in capsys.readouterr().err
    rc = main(["eval", "--simulate-shift", "--labels", str(tmp_path / "none.jsonl")])
    assert rc == 2 and "archroute label" in capsys.readouterr().err
