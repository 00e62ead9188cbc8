"""The copy probe on a backend pair, with bootstrap confidence intervals.

A held-out passage P (16, 64 or 256 tokens) appears, then filler (64 or 256 tokens), then
P again. Loss on the second occurrence measures exact recall; loss on the first measures
ordinary prediction of the same tokens. The gap is computed per item (same tokens under
both models), so its CI is paired.

    python -m models.training.probe --run runs/ref --out models/reference/copy_probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def bootstrap_ci(x: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap CI of the mean."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def run_probe(transformer, hybrid, val: dict[str, np.ndarray], seq_len: int = 1024,
              per_cell: int = 48) -> dict:
    """Per (group, length, distance) cell: mean first/second-occurrence loss for both
    models and the paired second-occurrence gap (T - H) with its bootstrap CI."""
    from models.training.train_reference import copy_probe

    items = copy_probe(val, seq_len, seed=11, per_cell=per_cell)
    seqs = [it["ids"].tolist() for it in items]
    lt = transformer.score_ids(seqs)
    lh = hybrid.score_ids(seqs)
    rows: dict[str, dict[str, list[float]]] = {}
    for it, a, b in zip(items, lt, lh, strict=True):
        key = f"{it['group']}/L{it['length']}/D{it['distance']}"
        r = rows.setdefault(key, {"t1": [], "t2": [], "h1": [], "h2": []})
        (a0, a1), (b0, b1) = it["first"], it["second"]
        # logprob index j predicts token j+1; skip each occurrence's first token
        r["t1"].append(-float(a[a0:a1 - 1].mean()))
        r["t2"].append(-float(a[b0:b1 - 1].mean()))
        r["h1"].append(-float(b[a0:a1 - 1].mean()))
        r["h2"].append(-float(b[b0:b1 - 1].mean()))
    out = {}
    for key, r in sorted(rows.items()):
        arr = {k: np.asarray(v) for k, v in r.items()}
        second_gap = arr["t2"] - arr["h2"]
        first_gap = arr["t1"] - arr["h1"]
        out[key] = {
            "n": len(arr["t1"]),
            **{k: float(v.mean()) for k, v in arr.items()},
            "second_gap": float(second_gap.mean()), "second_gap_ci": bootstrap_ci(second_gap),
            "first_gap": float(first_gap.mean()), "first_gap_ci": bootstrap_ci(first_gap),
        }
    return out


def to_markdown(res: dict) -> str:
    lines = ["| cell | n | T 1st | T 2nd | H 1st | H 2nd | 1st-occ. gap T-H [95% CI] | 2nd-copy gap T-H [95% CI] |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in res.items():
        lo1, hi1 = r["first_gap_ci"]
        lo2, hi2 = r["second_gap_ci"]
        lines.append(f"| {k} | {r['n']} | {r['t1']:.3f} | {r['t2']:.3f} | {r['h1']:.3f} | {r['h2']:.3f} | "
                     f"{r['first_gap']:+.3f} [{lo1:+.3f}, {hi1:+.3f}] | {r['second_gap']:+.3f} [{lo2:+.3f}, {hi2:+.3f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/ref"), help="run dir with tokens_val.npz")
    p.add_argument("--per-cell", type=int, default=48)
    p.add_argument("--out", type=Path, default=Path("models/reference/copy_probe.json"))
    a = p.parse_args(argv)
    from models.reference_pair import load_reference_pair

    val = dict(np.load(a.run / "tokens_val.npz"))
    t, h = load_reference_pair()
    res = run_probe(t, h, val, t.context_length, a.per_cell)
    a.out.write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    a.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
