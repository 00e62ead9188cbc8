"""Why a one-model-per-token gate does not reach the 50/50 mixture on a pair: hedging.

    python -m evals.span.hedging --suites real --per-source 100

Issue #23 asks for a span gate at least as good as the 50/50 mixture (both models on every
token, ``-log(0.5 p_T + 0.5 p_H)``). A gate picks one model's distribution per token; the
mixture averages two. This analysis separates the two sources of the mixture's gain, on the
same per-token scores as ``archroute span-eval`` (its cache; teacher-forced):

- **choosing**: *follow the leader* picks, per token, the model whose losses on the tokens so
  far were lower (an exponential moving average with ``decay``; the transformer first). It
  is given both models' losses on every earlier token, which no one-decode-per-token gate
  has (a gate sees the other model's only where it catches up), so it bounds what that
  information is worth to a hard choice;
- **hedging**: *fixed-share* mixes the two distributions with weights that follow their
  recent losses (Bayesian model averaging that lets the better model change, share
  ``alpha`` per token; Herbster & Warmuth 1998), and the 50/50 mixture mixes them evenly.

Beside them: always-transformer, the request oracle, the shipped learned gate (in-sample on
the real suite) and the token oracle (which chooses with hindsight). Pooled nats per answer
token with 95% bootstrap CIs over requests, as span-eval reports them. The decays and
shares are a sweep on the evaluated data, in hindsight: this is an analysis of what each
kind of policy can reach, not a policy to ship. Figures, not a test.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

DECAYS = (0.5, 0.9, 0.95)
SHARES = (0.02, 0.1, 0.2)


def follow_the_leader(lt: np.ndarray, lh: np.ndarray, decay: float) -> np.ndarray:
    """Per token, True where the transformer is chosen: the model with the lower moving
    average of its log-loss on the earlier tokens (the transformer on ties and first)."""
    out = np.empty(len(lt), dtype=bool)
    e = 0.0  # moving average of log p_T - log p_H over earlier tokens
    for i in range(len(lt)):
        out[i] = e >= 0.0
        e = decay * e + (1.0 - decay) * (lt[i] - lh[i])
    return out


def fixed_share(lt: np.ndarray, lh: np.ndarray, alpha: float) -> np.ndarray:
    """Per token, the log-probability of the fixed-share mixture of the two models (prior
    1/2 each; after each token, Bayes on its likelihoods, then ``alpha`` of the weight shared
    out evenly)."""
    out = np.empty(len(lt))
    w = 0.5  # weight of the transformer
    for i in range(len(lt)):
        a, b = np.log(w) + lt[i], np.log1p(-w) + lh[i]
        out[i] = np.logaddexp(a, b)
        post = float(np.exp(a - out[i]))
        w = min(max((1.0 - alpha) * post + alpha / 2.0, 1e-12), 1.0 - 1e-12)
    return out


def hedging_stats(seqs: Sequence, gates: dict | None = None, token_text=None) -> dict:
    """PolicyStats (evals.span.evaluate) per policy for ``seqs`` (ScoredSeq); ``gates``
    rolled out with ``token_text`` (the pair's token id -> text, for gates that read it)."""
    from evals.span.evaluate import _flops, _stack, baseline_stats, gate_stats, role_stats

    stats = baseline_stats(seqs)
    rows: dict[str, list] = {}
    for s in seqs:
        n, p = len(s), len(s.prompt_ids)
        lt, lh = s.lp[0].astype(np.float64), s.lp[1].astype(np.float64)
        both = _flops([p + n - 1, p + n - 1], None)
        for d in DECAYS:
            roles = follow_the_leader(lt, lh, d)
            r = role_stats(roles, s.lp, p, None)
            # it reads both models on every token: priced as the mixture, no catch-up
            rows.setdefault(f"follow-the-leader (decay {d})", []).append(
                (r[0], n, r[2], r[3], 0, *both))
        for a in SHARES:
            rows.setdefault(f"fixed-share (alpha {a})", []).append(
                (-float(fixed_share(lt, lh, a).sum()), n, np.nan, 0, 0, *both))
    stats.update({k: _stack(v) for k, v in rows.items()})
    if gates:
        stats.update(gate_stats(gates, seqs, token_text))
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.span.hedging", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", default=["real"],
                   help="built-in suites or .jsonl files (default: real)")
    p.add_argument("--per-source", type=int, default=100,
                   help="requests per request file in the real suite (default 100)")
    p.add_argument("--gate", default="learned", help="a gate to show beside (default learned)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--cache-dir", default=None, help="span-eval's per-token score cache")
    a = p.parse_args(argv)

    from evals.span.evaluate import summarize
    from evals.span.run import SpanConfig, load_pair, load_suites
    from evals.span.score import score_suite, token_texts
    from models.span.gates import get_gate

    cfg = SpanConfig(suites=list(a.suites), per_source=a.per_source)
    suites = load_suites(cfg)
    pair = load_pair(cfg)
    gate = get_gate(a.gate) if a.gate else None
    for suite in suites:
        seqs = score_suite(suite.requests, suite.name, pair[0], pair[1], a.cache_dir)
        stats = hedging_stats(seqs, {gate.name: gate} if gate else None, token_texts(pair[0]))
        summ = summarize(stats, a.bootstrap)
        tokens = int(sum(len(s) for s in seqs))
        print(f"\n{suite.name}: {len(seqs)} requests, {tokens} answer tokens; pooled nats/token "
              f"[95% CI], gain over always-transformer")
        print("| policy | models read per token | loss [95% CI] | gain vs always-T |")
        print("|---|---|---|---|")
        base = summ["always-transformer"]["loss"][0]
        order = sorted(summ, key=lambda k: summ[k]["loss"][0], reverse=True)
        for k in order:
            v, lo, hi = summ[k]["loss"]
            reads = ("both (hindsight)" if k == "token-oracle" else
                     "both" if k.startswith(("follow", "fixed", "mixture")) else
                     "one (+ catch-up)" if gate is not None and k == gate.name else "one")
            ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None else ""
            print(f"| {k} | {reads} | {v:.3f} {ci} | {base - v:+.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
