"""The per-request two-backend table every metric is computed on, and the RouterBench-style
importer that yields one straight from a published dataset.

Index 0 is the transformer, 1 the hybrid. ``quality`` is higher-is-better (minus the
reference's loss in nats/token for scored suites; the dataset's score for imported tables);
``costs`` maps a cost axis (flops, memory_bytes, wall_ms, usd) to an (n, 2) array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evals.harness.suites import EvalRequest, Suite, SuiteError


@dataclass
class PairTable:
    requests: list[EvalRequest]
    suite: list[str]
    quality: np.ndarray  # (n, 2)
    costs: dict[str, np.ndarray]  # axis -> (n, 2)
    loss: np.ndarray | None = None  # (n, 2) nats/token, when scored
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. task_score (n, 2)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def domain(self) -> list[str]:
        return [r.domain for r in self.requests]

    @property
    def kind(self) -> list[str]:
        return [r.kind for r in self.requests]

    def take(self, idx: np.ndarray) -> PairTable:
        idx = np.asarray(idx, dtype=int)
        return PairTable([self.requests[i] for i in idx], [self.suite[i] for i in idx],
                         self.quality[idx], {k: v[idx] for k, v in self.costs.items()},
                         None if self.loss is None else self.loss[idx],
                         {k: v[idx] for k, v in self.extra.items()})

    @classmethod
    def concat(cls, tables: list[PairTable]) -> PairTable:
        if not tables:
            raise ValueError("no tables to join")
        axes = set.intersection(*(set(t.costs) for t in tables))
        extra_keys = set.intersection(*(set(t.extra) for t in tables))
        losses = [t.loss for t in tables if t.loss is not None]  # all or nothing
        return cls(
            [r for t in tables for r in t.requests], [s for t in tables for s in t.suite],
            np.concatenate([t.quality for t in tables]),
            {a: np.concatenate([t.costs[a] for t in tables]) for a in sorted(axes)},
            np.concatenate(losses) if len(losses) == len(tables) else None,
            {k: np.concatenate([t.extra[k] for t in tables]) for k in sorted(extra_keys)},
        )


def table_from_records(suite: Suite, rec_t: list, rec_h: list,
                       prices: dict[str, float] | None = None) -> PairTable:
    """Join two backends' records (``scoring.BackendRecord``, in suite order); requests
    without a loss under both backends are left out. ``prices`` are $ per 1M tokens."""
    keep = [i for i, (a, b) in enumerate(zip(rec_t, rec_h, strict=True))
            if a.loss is not None and b.loss is not None]
    pair = [(rec_t[i], rec_h[i]) for i in keep]
    loss = np.array([[a.loss, b.loss] for a, b in pair], dtype=float).reshape(-1, 2)
    costs = {
        "wall_ms": np.array([[a.wall_ms, b.wall_ms] for a, b in pair], dtype=float).reshape(-1, 2),
    }
    if all(a.flops is not None and b.flops is not None for a, b in pair):
        costs["flops"] = np.array([[a.flops, b.flops] for a, b in pair], dtype=float).reshape(-1, 2)
        costs["memory_bytes"] = np.array([[a.memory_bytes, b.memory_bytes] for a, b in pair],
                                         dtype=float).reshape(-1, 2)
    if prices and {"transformer", "hybrid"} <= set(prices):
        costs["usd"] = np.array(
            [[(a.prompt_tokens + a.ref_tokens) * prices["transformer"] / 1e6,
              (b.prompt_tokens + b.ref_tokens) * prices["hybrid"] / 1e6] for a, b in pair],
            dtype=float).reshape(-1, 2)
    extra = {}
    if pair and all(a.task_score is not None and b.task_score is not None for a, b in pair):
        extra["task_score"] = np.array([[a.task_score, b.task_score] for a, b in pair], dtype=float)
    return PairTable([suite.requests[i] for i in keep], [suite.name] * len(keep), -loss, costs,
                     loss, extra)


# ---- RouterBench-style tables ---------------------------------------------------------------

def read_table(path: str | Path):
    """A pandas DataFrame from .csv, .jsonl, .json, .parquet or .pkl."""
    import pandas as pd

    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix.startswith(".csv"):
        return pd.read_csv(path)
    if suffix.startswith(".jsonl"):
        return pd.read_json(path, lines=True)
    if suffix.startswith(".json"):
        return pd.read_json(path)
    if suffix.startswith(".parquet"):
        return pd.read_parquet(path)
    if suffix.startswith((".pkl", ".pickle")):
        return pd.read_pickle(path)
    raise SuiteError(f"{path}: unknown table format (csv, jsonl, json, parquet, pkl)")


def routerbench_models(df) -> list[str]:
    """Models of a RouterBench-style table: a score column ``M`` with a ``M|total_cost`` beside it."""
    return [c for c in df.columns if "|" not in c and f"{c}|total_cost" in df.columns]


def load_routerbench(path: str | Path, transformer: str | None = None, hybrid: str | None = None,
                     name: str | None = None) -> tuple[Suite, PairTable]:
    """Import a RouterBench-style table: one row per prompt, a score column per model
    (higher is better) and a ``<model>|total_cost`` column ($ per request).

    Also read: ``prompt`` (required), ``sample_id`` (else the row number), ``eval_name``
    (the domain). ``transformer`` / ``hybrid`` name the two models to compare (default: the
    first two). Returns the suite (so policies can score its prompts) and the table
    (quality = the score, cost axis ``usd``)."""
    df = read_table(path)
    models = routerbench_models(df)
    if "prompt" not in df.columns:
        raise SuiteError(f"{path}: a RouterBench-style table needs a 'prompt' column")
    if len(models) < 2 and not (transformer and hybrid):
        raise SuiteError(f"{path}: need two models with score and '|total_cost' columns, found {models}")
    transformer = transformer or models[0]
    hybrid = hybrid or models[1]
    for m in (transformer, hybrid):
        if m not in df.columns or f"{m}|total_cost" not in df.columns:
            raise SuiteError(f"{path}: model {m!r} not found (models: {models})")
    df = df.dropna(subset=[transformer, hybrid, f"{transformer}|total_cost", f"{hybrid}|total_cost"])
    ids = df["sample_id"].astype(str) if "sample_id" in df.columns else df.index.astype(str)
    domains = df["eval_name"].astype(str) if "eval_name" in df.columns else ["general"] * len(df)
    reqs = tuple(EvalRequest(id=i, prompt=str(p), domain=d, kind="routerbench")
                 for i, p, d in zip(ids, df["prompt"], domains, strict=True))
    suite = Suite(name or Path(path).stem, reqs, f"routerbench:{path}",
                  meta={"transformer": transformer, "hybrid": hybrid})
    q = df[[transformer, hybrid]].to_numpy(dtype=float)
    c = df[[f"{transformer}|total_cost", f"{hybrid}|total_cost"]].to_numpy(dtype=float)
    return suite, PairTable(list(reqs), [suite.name] * len(reqs), q, {"usd": c})
