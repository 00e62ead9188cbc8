"""The eval's settings: every default in one place, overridden by a file, then the CLI."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from models.registry import REFERENCE_SPECS

COSTS = ("flops", "memory_bytes", "wall_ms", "usd")


def default_cache_dir() -> str:
    base = os.environ.get("ARCHROUTE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "archroute")
    return os.path.join(base, "eval")


@dataclass
class EvalConfig:
    """Settings of one ``archroute eval`` run (saved in every result's provenance)."""

    # what to run
    suites: list[str] = field(default_factory=lambda: ["humaneval", "corpus"])  # built-ins or paths
    policies: list[str] | None = None  # None = every registered policy (+ the oracle)
    policy_kwargs: dict[str, dict] = field(default_factory=dict)  # name -> get_policy kwargs
    transformer: str = REFERENCE_SPECS["transformer"]  # backend spec (models/registry.py)
    hybrid: str = REFERENCE_SPECS["hybrid"]
    limit: int | None = None  # first N requests of each suite
    # built-in suites
    corpus: str = "data/corpus/val.jsonl"  # the held-out reference corpus
    corpus_per_domain: int = 80  # requests per domain (spread over the kinds)
    humaneval_n: int | None = None  # first N HumanEval problems (None = all 164)
    real_per_source: int = 40  # requests per request file in the real suite ($ARCHROUTE_REQUESTS)
    # scoring
    batch_size: int = 1  # score_batch size (1 = wall time measured per request)
    torch_threads: int | None = None  # None = leave torch's setting
    generate: bool = False  # also generate and apply each request's task metric (slow)
    gen_max_tokens: int = 48
    prices: dict[str, float] = field(default_factory=dict)  # "transformer"/"hybrid" -> $ per 1M tokens
    # metrics
    cost: str = "flops"  # the cost axis: flops | memory_bytes | wall_ms | usd
    # operating threshold: None = each policy's own default_threshold() (0.5 for most; the
    # classifier's is chosen on validation data); a number overrides it for every policy
    threshold: float | None = None
    bootstrap: int = 1000  # resamples for the 95% intervals (0 = none)
    seed: int = 0
    # where
    out: str = "eval-out"
    cache_dir: str = field(default_factory=default_cache_dir)
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost!r}")
        unknown = set(self.prices) - {"transformer", "hybrid"}
        if unknown:
            raise ValueError(f"prices: unknown backends {sorted(unknown)}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.real_per_source < 1:
            raise ValueError("real_per_source must be >= 1")
        if self.bootstrap < 0 or self.batch_size < 1 or self.gen_max_tokens < 1:
            raise ValueError("bootstrap >= 0, batch_size >= 1 and gen_max_tokens >= 1 required")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")

    @classmethod
    def from_sources(cls, file: str | Path | None = None, **overrides) -> EvalConfig:
        """Defaults, then ``file`` (JSON or YAML), then ``overrides`` (None values ignored).
        Unknown keys are rejected."""
        known = {f.name for f in fields(cls)}
        values: dict = {}
        if file:
            text = Path(file).read_text(encoding="utf-8")
            if str(file).endswith((".yaml", ".yml")):
                import yaml

                loaded = yaml.safe_load(text) or {}
            else:
                loaded = json.loads(text)
            if not isinstance(loaded, dict):
                raise ValueError(f"{file}: expected a mapping of settings")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown eval settings {sorted(unknown)} (known: {sorted(known)})")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)
