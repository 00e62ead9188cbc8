"""Run gates along teacher-forced sequences and measure loss, switching and cost.

Rollout (:func:`rollout`): ``state = gate.start(prompt_ids, token_text)``; then for each
answer position ``i``: ``role = state.choose()``, that model's log-prob of the true token is
taken, and ``state.push(answer[i], role, entropy of that model at i)``. The gate sees only
what a decoder would have: never the token it is choosing a model for.

Per request and policy (:class:`PolicyStats`): the summed loss (nats), answer tokens, tokens
given to the transformer, switches (role changes between consecutive answer tokens),
catch-up tokens and FLOPs. Catch-up: a model that takes over must first process the other
model's tokens since it last ran (from the answer's start when it has not run yet); a model
that produced tokens ``j`` and takes over at ``i`` catches up ``i - j - 1`` tokens. So over a
request a model ``M`` processes the prompt and every answer token before its last one, and
its catch-up tokens are those among them the other model produced. FLOPs
(:class:`models.cost.CostModel`): each model used processes ``len(prompt_ids) + last_M``
tokens (``prefill_flops``, the same whether they come one by one or as a catch-up batch);
the 50/50 mixture runs both models on every token; the per-token oracle is counted like a
gate whose roles are known.

Baselines: always-transformer, always-hybrid, the request-level oracle (per request the
model with the lower mean loss), the 50/50 mixture (``-log(0.5 p_T + 0.5 p_H)`` per token)
and the per-token oracle (``min`` of the two losses per token).

Summaries (:func:`summarize`): loss per answer token with tokens pooled (total nats / total
tokens: the headline, as in issue #14's table) and the mean of per-request means, each with
a 95% bootstrap CI resampling requests; the gain over the request-level oracle (pooled,
positive = better than the oracle) with its CI from the same replicates (paired).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from evals.span.score import ScoredSeq

BASELINES = ("always-transformer", "always-hybrid", "request-oracle", "mixture-50/50",
             "token-oracle")
REF = "request-oracle"  # the gain is measured against it


def rollout(gate, seq: ScoredSeq, token_text: Callable[[int], str] | None = None) -> np.ndarray:
    """The roles ``gate`` picks along ``seq``: bool (n,), True = the transformer."""
    return rollout_mixed(gate, seq, token_text)[0]


def rollout_mixed(gate, seq: ScoredSeq, token_text: Callable[[int], str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The roles ``gate`` picks along ``seq`` (bool (n,), True = the transformer) and where
    it asks for both models' mixture instead (bool (n,); a MixGate's ``state.mix``)."""
    return rollout_weights(gate, seq, token_text)[:2]


def rollout_weights(gate, seq: ScoredSeq, token_text: Callable[[int], str] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`rollout_mixed` and, per token, the transformer's weight in the mixture as
    log-odds (float (n,); 0 = 50/50; a MixGate's ``state.mix_lo``) and whether a copy lock
    forced the choice (bool (n,); ``state.locked``). The gate is pushed the chosen model's
    entropy either way, as the decoder does."""
    state = gate.start(seq.prompt_ids.tolist(), token_text)
    ent_t, ent_h = seq.ent[0].tolist(), seq.ent[1].tolist()
    out = np.empty(len(seq), bool)
    mixed = np.zeros(len(seq), bool)
    lo = np.zeros(len(seq))
    locked = np.zeros(len(seq), bool)
    for i, tok in enumerate(seq.answer_ids.tolist()):
        role = state.choose()
        mixed[i], locked[i] = state.mix, getattr(state, "locked", False)
        if state.mix:
            lo[i] = getattr(state, "mix_lo", 0.0)
        if role == "transformer":
            out[i] = True
            state.push(tok, role, ent_t[i])
        elif role == "hybrid":
            out[i] = False
            state.push(tok, role, ent_h[i])
        else:
            raise ValueError(f"gate {gate.name!r} chose {role!r}; expected transformer or hybrid")
    return out, mixed, lo, locked


@dataclass
class PolicyStats:
    """Per-request figures of one policy, arrays of shape (R,): ``nll`` summed loss (nats),
    ``n`` answer tokens, ``n_t`` tokens to the transformer (NaN for the mixture: both),
    ``mixed`` tokens predicted by both models' 50/50 mixture (a mixing gate; the mixture
    baseline: all),
    ``switches``, ``catchup`` tokens, ``flops`` (the pair's cost models) and ``flops_7b``
    (the same token counts priced with the 7B pair's cost models)."""

    nll: np.ndarray
    n: np.ndarray
    n_t: np.ndarray
    switches: np.ndarray
    catchup: np.ndarray
    flops: np.ndarray
    flops_7b: np.ndarray
    mixed: np.ndarray | None = None  # tokens both models' mixture predicted (None: none)

    def take(self, idx: np.ndarray) -> PolicyStats:
        from dataclasses import replace

        return replace(self, **{f: getattr(self, f)[idx] for f in self.__dataclass_fields__
                                if getattr(self, f) is not None})


@dataclass
class CostModels:
    """(transformer, hybrid) cost models: the pair's own and the 7B pair's."""

    pair: tuple
    big: tuple

    @classmethod
    def for_pair(cls, transformer, hybrid) -> CostModels:
        from models.cost import CostModel

        return cls((transformer.cost_model(), hybrid.cost_model()),
                   (CostModel.olmo3_7b(), CostModel.olmo_hybrid_7b()))


def mixture_lp(lp: np.ndarray, lo: np.ndarray | float = 0.0) -> np.ndarray:
    """log p of each token under the mixture of both models with the transformer's weight
    ``sigmoid(lo)`` (``lp`` (2, n); ``lo`` log-odds, 0 = 50/50)."""
    lo = np.asarray(lo, dtype=np.float64)
    return np.logaddexp(lp[0] - np.logaddexp(0.0, -lo), lp[1] - np.logaddexp(0.0, lo))


def role_stats(roles: np.ndarray, lp: np.ndarray, n_prompt: int,
               costs: CostModels | None = None, mixed: np.ndarray | None = None,
               mix_lo: np.ndarray | None = None) -> tuple[float, ...]:
    """(nll, n, n_t, switches, catch-up tokens, flops, flops_7b) of one request; ``roles``
    bool (n,) True = transformer, ``lp`` (2, n); ``mixed`` (optional, bool (n,)): tokens
    predicted by both models' mixture (both read them; n_t counts the chosen role), the
    transformer's weight there ``sigmoid(mix_lo)`` (log-odds (n,); None = 50/50)."""
    n = len(roles)
    nll = -float(np.where(roles, lp[0], lp[1]).sum())
    if mixed is not None and mixed.any():
        mix = mixture_lp(lp, 0.0 if mix_lo is None else mix_lo)
        nll = -float(np.where(mixed, mix, np.where(roles, lp[0], lp[1])).sum())
    switches = int((roles[1:] != roles[:-1]).sum()) if n > 1 else 0
    catchup = 0
    processed = []  # tokens each model processes (0: not used)
    both = mixed if mixed is not None else np.zeros(n, bool)
    for mine in (roles | both, ~roles | both):
        where = np.flatnonzero(mine)
        if not len(where):
            processed.append(0)
            continue
        last = int(where[-1])
        catchup += int((~mine[:last]).sum())
        processed.append(n_prompt + last)
    return (nll, n, int(roles.sum()), switches, catchup, *_flops(processed, costs))


def _flops(processed: Sequence[int], costs: CostModels | None) -> tuple[float, float]:
    if costs is None:
        return float("nan"), float("nan")
    out = []
    for cms in (costs.pair, costs.big):
        out.append(sum(cm.prefill_flops(k) if cm is not None and k else (0.0 if k == 0 else np.nan)
                       for cm, k in zip(cms, processed, strict=True)))
    return out[0], out[1]


def _stack(rows: list[tuple]) -> PolicyStats:
    a = np.array(rows, dtype=np.float64).reshape(-1, 7)
    return PolicyStats(*(a[:, k] for k in range(7)))


def baseline_stats(seqs: Sequence[ScoredSeq], costs: CostModels | None = None) -> dict[str, PolicyStats]:
    """The five baselines (:data:`BASELINES`) per request."""
    rows: dict[str, list] = {k: [] for k in BASELINES}
    for s in seqs:
        n, p = len(s), len(s.prompt_ids)
        all_t, all_h = np.ones(n, bool), np.zeros(n, bool)
        rt = role_stats(all_t, s.lp, p, costs)
        rh = role_stats(all_h, s.lp, p, costs)
        rows["always-transformer"].append(rt)
        rows["always-hybrid"].append(rh)
        rows["request-oracle"].append(rt if rt[0] <= rh[0] else rh)
        rows["token-oracle"].append(role_stats(s.lp[0] >= s.lp[1], s.lp, p, costs))
        mix = -float(np.logaddexp(s.lp[0], s.lp[1]).sum() - n * np.log(2.0))
        both = _flops([p + n - 1, p + n - 1], costs)
        rows["mixture-50/50"].append((mix, n, np.nan, 0, 0, *both))
    out = {k: _stack(v) for k, v in rows.items()}
    out["mixture-50/50"].mixed = out["mixture-50/50"].n.copy()
    return out


GateSpec = object  # a Gate, or a callable ScoredSeq -> Gate (per-request gates, e.g. LOSO folds)


def gate_stats(gates: Mapping[str, GateSpec], seqs: Sequence[ScoredSeq],
               token_text: Callable[[int], str] | None = None, costs: CostModels | None = None,
               progress: bool = False, us_per_token: dict[str, float] | None = None
               ) -> dict[str, PolicyStats]:
    """Each gate rolled out along every sequence (a callable picks a gate per sequence).
    ``us_per_token``, when given, receives each gate's rollout time (``start``, ``choose``
    and ``push``) in microseconds per answer token."""
    import time

    from tqdm.auto import tqdm

    out = {}
    for name, g in gates.items():
        rows, spent, n_mixed = [], 0.0, []
        for s in tqdm(seqs, desc=f"gate {name}", unit="req", leave=False, disable=not progress,
                      dynamic_ncols=True):
            gate = g(s) if callable(g) and not hasattr(g, "start") else g
            t0 = time.perf_counter()
            roles, mixed, lo, _ = rollout_weights(gate, s, token_text)
            spent += time.perf_counter() - t0
            rows.append(role_stats(roles, s.lp, len(s.prompt_ids), costs, mixed, lo))
            n_mixed.append(int(mixed.sum()))
        out[name] = _stack(rows)
        out[name].mixed = np.asarray(n_mixed, dtype=np.float64)
        if us_per_token is not None:
            us_per_token[name] = spent / max(1, sum(len(s) for s in seqs)) * 1e6
    return out


def _boot(stats: Mapping[str, PolicyStats], n_boot: int, seed: int) -> np.ndarray | None:
    from evals.analysis.stats import cluster_weights

    r = len(next(iter(stats.values())).n)
    return cluster_weights(r, n_boot, seed) if n_boot and r > 1 else None


def _ci(point: float, boot: np.ndarray | None) -> list[float | None]:
    if boot is None:
        return [point, None, None]
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    return [point, float(lo), float(hi)]


def summarize(stats: Mapping[str, PolicyStats], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per policy: ``loss`` (tokens pooled) and ``loss_req`` (mean of per-request means) as
    [value, lo, hi]; ``gain`` over the request oracle (pooled, > 0 = better) with its
    paired CI; ``gain_t`` and ``gain_mixture``: the same over always-transformer and over
    the 50/50 mixture (issue #23's bars); ``share_t``, ``switches_per_100``, ``catchup_per_100`` (per 100 answer
    tokens); ``flops_rel`` and ``flops_7b_rel`` (total FLOPs relative to always-transformer);
    ``requests``, ``tokens``."""
    W = _boot(stats, n_boot, seed)
    ref, base = stats.get(REF), stats.get("always-transformer")
    refs = {"gain": ref, "gain_t": base, "gain_mixture": stats.get("mixture-50/50")}
    out = {}
    for name, s in stats.items():
        tokens = float(s.n.sum())
        per_req = s.nll / np.maximum(s.n, 1)
        row = {"requests": int(len(s.n)), "tokens": int(tokens),
               "loss": _ci(float(s.nll.sum() / tokens),
                           None if W is None else (W @ s.nll) / (W @ s.n)),
               "loss_req": _ci(float(per_req.mean()),
                               None if W is None else (W @ per_req) / W.sum(1))}
        for key, r in refs.items():  # paired: the same resampled requests for both
            if r is not None:
                row[key] = _ci(float((r.nll.sum() - s.nll.sum()) / tokens),
                               None if W is None else (W @ (r.nll - s.nll)) / (W @ s.n))
        with np.errstate(invalid="ignore"):
            row["share_t"] = float(s.n_t.sum() / tokens)
        row["switches_per_100"] = float(100 * s.switches.sum() / tokens)
        row["catchup_per_100"] = float(100 * s.catchup.sum() / tokens)
        row["mixed_per_100"] = float(100 * s.mixed.sum() / tokens) if s.mixed is not None else 0.0
        if base is not None:
            row["flops_rel"] = float(s.flops.sum() / base.flops.sum())
            row["flops_7b_rel"] = float(s.flops_7b.sum() / base.flops_7b.sum())
        out[name] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                     for k, v in row.items()}
    return out


def by_group(stats: Mapping[str, PolicyStats], groups: Sequence[str], n_boot: int = 1000,
             seed: int = 0) -> dict[str, dict[str, dict]]:
    """:func:`summarize` for the requests of each group (e.g. each source)."""
    g = np.asarray(groups)
    return {k: summarize({n: s.take(np.flatnonzero(g == k)) for n, s in stats.items()},
                         n_boot, seed) for k in sorted(set(groups))}


def compare(stats: Mapping[str, PolicyStats], a: str, b: str, n_boot: int = 1000,
            seed: int = 0) -> list[float | None]:
    """How much better ``a`` is than ``b`` (loss of b - loss of a, tokens pooled, nats per
    token; > 0: a is better) with a paired 95% CI (the replicates of :func:`summarize`)."""
    sa, sb = stats[a], stats[b]
    W = _boot(stats, n_boot, seed)
    point = float((sb.nll.sum() - sa.nll.sum()) / sa.n.sum())
    return _ci(point, None if W is None else (W @ (sb.nll - sa.nll)) / (W @ sa.n))
