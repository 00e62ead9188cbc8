"""Hindsight ceilings of request routing (classifiers/training/ceiling.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from classifiers.training.ceiling import ceilings, main


def _row(i: int, group: str, kind: str, lt: float, lh: float, share: float = 0.0) -> dict:
    return {"id": f"{group}-{i}", "group": group, "kind": kind, "gap": lt - lh,
            "loss_transformer": lt, "loss_hybrid": lh, "copy4_share": share}


def _rows(seed: int = 0) -> list[dict]:
    """Source a: the transformer wins exactly where the answer copies (share 0.5); source b:
    the hybrid always wins; plus an eval-only source that must be ignored."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(200):
        copies = bool(rng.random() < 0.5)
        lt, lh = (2.0, 3.0) if copies else (3.0, 2.5)
        rows.append(_row(i, "a", "qa", lt, lh, 0.5 if copies else 0.0))
    rows += [_row(i, "b", "chat", 4.0, 3.0) for i in range(100)]
    rows += [_row(i, "selfinstruct_user_eval", "chat", 0.0, 9.0) for i in range(50)]
    return rows


def test_ceilings_rank_what_each_router_knows() -> None:
    res = ceilings(_rows(), n_boot=50)
    r = res["routers"]
    assert res["n"] == 300  # the eval-only rows are not counted
    # the copy share decides source a exactly and source b never copies: the oracle
    assert r["copy4>0"]["recovered"] == pytest.approx(1.0)
    assert r["source/kind + copy4"]["recovered"] == pytest.approx(1.0)
    # knowing the source gets b right and a to its better backend only
    assert 0 < r["source"]["recovered"] < 1
    assert r["source"]["recovered"] == pytest.approx(r["source/kind"]["recovered"])
    # the oracle's gain splits exactly into its between- and within-cell parts
    assert res["between_cells"] + res["within_cells"] == pytest.approx(res["oracle_gain"])
    assert [c["cell"] for c in res["cells"]][0] == "a/qa"
    assert res["cells"][-1]["within_gain"] == pytest.approx(0.0)


def test_ceilings_need_trainable_rows() -> None:
    with pytest.raises(ValueError, match="no trainable"):
        ceilings([_row(0, "selfinstruct_user_eval", "chat", 1.0, 2.0)])


def test_cli_writes_json_and_markdown(tmp_path, capsys) -> None:
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "c" / "ceiling.json"
    assert main(["--labels", str(labels), "--out", str(out), "--bootstrap", "20"]) == 0
    assert "hindsight router" in capsys.readouterr().out
    assert json.loads(out.read_text())["routers"]["source"]["recovered"] > 0
    assert out.with_suffix(".md").read_text().startswith("| hindsight router")
    assert main(["--labels", str(tmp_path / "missing.jsonl")]) == 2
    assert "no label file" in capsys.readouterr().err


def test_in_distribution_separates_kinds_and_measures_skill_inside_them() -> None:
    """Rows whose kind decides the winner: the shipped model under random CV ranks across
    kinds almost perfectly, and inside a kind there is (nearly) nothing to gain."""
    from classifiers.training.ceiling import in_distribution
    from tests.classifiers.test_transfer import _real_rows

    res = in_distribution(_real_rows(240, eval_rows=10), k=3, n_boot=20, progress=False)
    assert res["pooled"]["n"] == 240 and res["pooled"]["auc"] > 0.9
    assert {c["cell"].split("/")[1] for c in res["cells"]} == {"copy", "open"}
    for c in res["cells"]:  # one backend wins (nearly) every row of a kind: little to gain
        assert np.isnan(c["auc"]) or 0.0 <= c["auc"] <= 1.0
        assert c["within_gain"] < 0.01
        if np.isfinite(c["recovered_at_0.5"]):
            assert c["recovered_best_cut_hindsight"] >= c["recovered_at_0.5"] - 1e-9
