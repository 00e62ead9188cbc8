"""The model card's figures and tables, from the shipped training logs."""

import json
import shutil
from pathlib import Path

import pytest

from models.training import card

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "reference"


def test_card_tables_from_the_shipped_logs(tmp_path):
    for name in ("metrics_transformer.jsonl", "metrics_hybrid.jsonl", "train_config.json"):
        shutil.copy(SHIPPED / name, tmp_path / name)
    assert card.main(["--dir", str(tmp_path)]) == 0
    text = (tmp_path / "card_tables.md").read_text()
    last = card.load(tmp_path / "metrics_transformer.jsonl")[1][-1]
    assert f"Final evaluation at step {last['step']}" in text
    assert f"| **mean** | **{last['val_mean']:.3f}**" in text
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    assert (tmp_path / "copy_probe.png").stat().st_size > 10_000


def test_request_gap_histogram(tmp_path):
    rows = [{"gap": g, "kind": k} for g, k in [(-1.2, "quote"), (-0.9, "extract"), (0.3, "continue"),
                                               (0.01, "explain"), (0.5, "summarize")]]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    card.plot_request_gaps(labels, tmp_path / "gaps.png")
    assert (tmp_path / "gaps.png").stat().st_size > 5_000
    labels.write_text("")
    with pytest.raises(SystemExit, match="no labelled requests"):
        card.plot_request_gaps(labels, tmp_path / "none.png")
