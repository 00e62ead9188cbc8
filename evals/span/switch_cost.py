"""Switch-priced learned gate: the frontier of loss against speed against switches/100, and
the shipped switch cost, chosen on the learned gate's TRAINING sources only.

``python -m evals.span.switch_cost [--costs 0,0.1,...] [--write]``

The learned gate (:class:`models.span.learned.LearnedGate`) predicts the transformer's
advantage on the next token in nats; ``switch_cost`` (nats) is a hysteresis around its
threshold: the other model takes over only when the predicted advantage pays for the
switch. For each cost this rolls the gate out (teacher-forced, the same rollout as
``archroute span-eval``) over the gate's training requests (the real suite's trainable
files, evaluation-only and reserved files left out, plus the corpus-train and
function-completion requests: :func:`evals.span.run.training_seqs`, the shipped gate's
data) and reports pooled loss, the transformer's share, switches and catch-up per 100
tokens, and an **estimated** speed against the transformer alone: forward costs measured
here on the pair (a decode step of each model, a catch-up forward of each, a transformer
verify forward of a draft), counted along each rollout with drafting simulated (a draft is
accepted while the reference answer continues the induction match and the gate keeps the
transformer). The estimate leaves out per-token Python work (sampling, entropy, the gate:
about 0.1 ms) and prompt prefill; ``archroute bench span`` measures the real thing.

Choice rule (fixed before looking at any result, training sources only): the largest cost
in the grid whose pooled loss is within ``--tolerance`` (default 0.005 nats/token) of the
cost-0 gate's. ``--write`` saves the shipped gate with that cost (threshold, trees and
weights unchanged; the frontier in ``meta.switch_cost``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def forward_costs(t, h, n_ctx: int = 150, k: int = 8, reps: int = 30) -> dict[str, float]:
    """Seconds per forward on the pair, median of ``reps`` (the five kinds interleaved, so
    that load that comes and goes falls on all alike): decode steps (1 token after
    ``n_ctx``), catch-up forwards (5 tokens), a transformer verify forward (1 + ``k``)."""
    import torch

    kinds = {"t_decode": (t, 1), "t_catchup": (t, 5), "t_verify": (t, 1 + k),
             "h_decode": (h, 1), "h_catchup": (h, 5)}
    out: dict[str, list[float]] = {name: [] for name in kinds}
    with torch.no_grad():
        for _ in range(reps):
            for name, (b, n_new) in kinds.items():
                ids = torch.tensor([[b.prefix_id] + [300] * (n_ctx - 1)])
                res = b.model(input_ids=ids, use_cache=True)
                cache = getattr(res, "cache", None) or res.past_key_values
                new = torch.tensor([[301] * n_new])
                t0 = time.perf_counter()
                b.model(input_ids=new, use_cache=True, **{b.cache_kw: cache})
                out[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in out.items()}


def simulate(gate, seq, token_text, draft_k: int, min_match: int) -> tuple[np.ndarray, int]:
    """Roles along ``seq`` (bool, True = transformer) and the transformer's forwards with
    drafting simulated (``draft_k`` 0: one per transformer token)."""
    from models.span.decoder import induction_draft

    state = gate.start(seq.prompt_ids.tolist(), token_text)
    ent_t, ent_h = seq.ent[0].tolist(), seq.ent[1].tolist()
    ans = seq.answer_ids.tolist()
    roles = np.empty(len(ans), bool)
    t_forwards, covered, prev = 0, 0, None
    for i, tok in enumerate(ans):
        role = state.choose()
        if role == "transformer":
            if covered > 0 and prev == "transformer":
                covered -= 1  # this position's logits came with the last verify forward
            else:
                t_forwards += 1
                draft = induction_draft(state.matcher, draft_k, min_match) if draft_k else []
                m = 0
                while m < len(draft) and i + m < len(ans) and ans[i + m] == draft[m]:
                    m += 1
                covered = m
            roles[i] = True
            state.push(tok, role, ent_t[i])
        else:
            covered = 0
            roles[i] = False
            state.push(tok, role, ent_h[i])
        prev = role
    return roles, t_forwards


def frontier(gate, seqs, token_text, costs: list[float], fc: dict[str, float],
             draft_k: int, min_match: int) -> list[dict]:
    base = gate.switch_cost
    rows = []
    try:
        for c in costs:
            gate.switch_cost = c
            nll = n = n_t = sw = cu = 0.0
            sec_plain = sec_draft = 0.0
            for seq in seqs:
                roles, t_fw = simulate(gate, seq, token_text, draft_k, min_match)
                lp = seq.lp
                nll -= float(np.where(roles, lp[0], lp[1]).sum())
                n += len(roles)
                n_t += int(roles.sum())
                to_t = int((roles[1:] & ~roles[:-1]).sum())
                to_h = int((~roles[1:] & roles[:-1]).sum())
                sw += to_t + to_h
                for mine in (roles, ~roles):
                    where = np.flatnonzero(mine)
                    if len(where):
                        cu += int((~mine[:where[-1]]).sum())
                n_h = len(roles) - int(roles.sum())
                extra = (to_t * (fc["t_catchup"] - fc["t_decode"])
                         + to_h * (fc["h_catchup"] - fc["h_decode"]))
                sec_plain += int(roles.sum()) * fc["t_decode"] + n_h * fc["h_decode"] + extra
                sec_draft += t_fw * fc["t_verify"] + n_h * fc["h_decode"] + extra
            alone = n * fc["t_decode"]
            rows.append({"switch_cost": c, "loss": nll / n, "share_t": n_t / n,
                         "switches_100": 100 * sw / n, "catchup_100": 100 * cu / n,
                         "est_x_t": alone / sec_plain, "est_x_t_draft": alone / sec_draft,
                         "tokens": int(n)})
    finally:
        gate.switch_cost = base
    return rows


def choose(rows: list[dict], tolerance: float) -> dict:
    """The largest cost whose loss is within ``tolerance`` of the cost-0 row's."""
    ref = next(r for r in rows if r["switch_cost"] == 0)
    ok = [r for r in rows if r["loss"] <= ref["loss"] + tolerance]
    return max(ok, key=lambda r: r["switch_cost"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.span.switch_cost", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--costs", default="0,0.1,0.2,0.3,0.5,0.75,1.0,1.5",
                   help="switch costs to try (nats; must include 0)")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="loss (nats/token) the chosen cost may add over cost 0")
    p.add_argument("--per-source", type=int, default=100)
    p.add_argument("--train-functions", type=int, default=200)
    p.add_argument("--draft-k", type=int, default=8)
    p.add_argument("--draft-min-match", type=int, default=2)
    p.add_argument("--gate", default=None, help="a gate.json (default: the shipped gate)")
    p.add_argument("--write", action="store_true",
                   help="save the shipped gate with the chosen cost")
    p.add_argument("--out", default="runs/span-switch-cost", help="results folder")
    a = p.parse_args(argv)
    costs = [float(c) for c in a.costs.split(",")]
    if 0.0 not in costs or any(c < 0 for c in costs):
        p.error("--costs: non-negative, and 0 among them")

    import torch

    from evals.span.run import SpanConfig, load_pair, training_seqs
    from evals.span.score import token_texts
    from models.span.learned import DEFAULT_DIR, load_learned_gate

    torch.set_num_threads(1)
    cfg = SpanConfig(suites=["real"], per_source=a.per_source, train_functions=a.train_functions)
    pair = load_pair(cfg)
    seqs, files = training_seqs(cfg, pair, progress=False)
    gate = load_learned_gate(a.gate)
    text = token_texts(pair[0])
    fc = forward_costs(pair[0], pair[1], k=a.draft_k)
    print(f"{len(seqs)} training requests ({sum(len(s) for s in seqs):,} answer tokens; "
          f"sources: {', '.join(sorted({s.source.split(':')[0] for s in seqs}))})")
    print("forward costs (ms, median of 30): " + ", ".join(
        f"{k} {1000 * v:.2f}" for k, v in fc.items()))
    rows = frontier(gate, seqs, text, costs, fc, a.draft_k, a.draft_min_match)
    lt = sum(-float(s.lp[0].sum()) for s in seqs) / sum(len(s) for s in seqs)
    mix = sum(-float(np.logaddexp(s.lp[0], s.lp[1]).sum() - len(s) * np.log(2))
              for s in seqs) / sum(len(s) for s in seqs)
    print(f"always-transformer {lt:.4f}, mixture 50/50 {mix:.4f} nats/token")
    print(f"{'switch cost':>11s} {'loss':>7s} {'vs 0':>7s} {'T share':>7s} {'switch/100':>10s} "
          f"{'catchup/100':>11s} {'est x T':>8s} {'+draft':>7s}")
    ref = rows[0]["loss"] if rows[0]["switch_cost"] == 0 else next(
        r["loss"] for r in rows if r["switch_cost"] == 0)
    for r in rows:
        print(f"{r['switch_cost']:11.2f} {r['loss']:7.4f} {r['loss'] - ref:+7.4f} "
              f"{100 * r['share_t']:6.0f}% {r['switches_100']:10.1f} {r['catchup_100']:11.1f} "
              f"{r['est_x_t']:8.2f} {r['est_x_t_draft']:7.2f}")
    pick = choose(rows, a.tolerance)
    print(f"chosen (largest cost within {a.tolerance} nats/token of cost 0, training sources "
          f"only): switch_cost {pick['switch_cost']}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "chosen": pick, "tolerance": a.tolerance, "forward_costs": fc,
              "always_transformer": lt, "mixture": mix, "trained_on": files,
              "draft_k": a.draft_k, "draft_min_match": a.draft_min_match}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if a.write:
        gate.switch_cost = pick["switch_cost"]
        gate.meta["switch_cost"] = {k: v for k, v in result.items() if k != "trained_on"}
        path = gate.save(DEFAULT_DIR if a.gate is None else a.gate)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
