"""The learned span gate over engines: trained on the top-k entropy proxy (issue #23 item 4).

The learned gate reads the entropy of the model that produced each token (``ent_last``,
``ent_t``, ``ent_h``, ``ent_avg``: :mod:`models.span.learned`). An engine's completions API
does not return it, but ``logprobs: k`` returns the k most likely tokens' log-probabilities,
from which :func:`models.span.remote.topk_entropy` computes a lower bound (the top k's own
terms, the rest of the mass as if spread over tokens as likely as the k-th). A gate trained on that proxy instead of the entropy
runs over engines (:class:`models.span.remote.RemoteSpanBackend` asks each span for
``logprobs: k`` and pushes the proxy); its artifact says so (``meta.entropy: "topk:K"``).

Training is the span-eval path unchanged (:func:`evals.span.run.training_seqs` for the
scored requests, :func:`evals.span.train.train_gate` for the fit): only each sequence's
``ent`` is replaced by the proxy, computed here from one forward pass per model over the
cached sequences (:func:`proxy_seqs`). With ``--holdout SRC,...`` it is a proof: a gate on
the full entropy and a gate on the proxy are trained on the other sources and both are
rolled out teacher-forced on the held-out ones (pooled nats/token beside always-transformer,
``copy-2`` and the 50/50 mixture). Without it the proxy gate is trained on every source and
saved to ``--out`` (a new artifact under runs/; the shipped gate is not touched)::

    python -m evals.span.topk --out runs/gate-topk --per-source 8 --holdout dolly,mbpp
    python -m evals.span.topk --out runs/gate-topk --per-source 100 --train-functions 200
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from evals.span.score import ScoredSeq

log = logging.getLogger(__name__)

K = 5  # log-probabilities per token (OpenAI's completions allow at most 5)


def proxy_entropies(backend, seqs: Sequence[ScoredSeq], k: int = K,
                    batch_size: int = 8) -> list[np.ndarray]:
    """Per sequence, the top-``k`` entropy proxy (nats, float32 (n,)) of ``backend``'s
    next-token distribution at each answer position: what
    :func:`models.span.remote.topk_entropy` gives from an engine's ``logprobs: k``."""
    import torch

    full = [np.concatenate([s.prompt_ids, s.answer_ids]).tolist() for s in seqs]
    out: list[np.ndarray | None] = [None] * len(seqs)
    with torch.no_grad():
        for idx, _ids, logits in backend.forward_batches(full, batch_size):
            for r, i in enumerate(idx):
                start, n = len(seqs[i].prompt_ids), len(full[i])
                logp = torch.log_softmax(logits[r, start - 1:n - 1].double(), dim=-1)
                top = torch.topk(logp, k, dim=-1).values
                p = top.exp()
                tail = (1.0 - p.sum(-1)).clamp_min(0.0)
                h = -(p * top).sum(-1) - tail * top[:, -1]
                out[i] = h.float().cpu().numpy()
    return [x for x in out if x is not None]


def proxy_seqs(seqs: Sequence[ScoredSeq], pair, k: int = K, batch_size: int = 8) -> list[ScoredSeq]:
    """``seqs`` with ``ent`` (2, n) replaced by each model's top-``k`` proxy."""
    t = proxy_entropies(pair[0], seqs, k, batch_size)
    h = proxy_entropies(pair[1], seqs, k, batch_size)
    return [replace(s, ent=np.stack([a, b])) for s, a, b in zip(seqs, t, h, strict=True)]


def pooled(stats) -> float:
    """Pooled loss (nats per answer token) of one policy's :class:`PolicyStats`."""
    return float(stats.nll.sum() / stats.n.sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.span.topk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where the proxy gate is saved (runs/...)")
    p.add_argument("--k", type=int, default=K, help=f"log-probabilities per token (default {K})")
    p.add_argument("--per-source", type=int, default=8, help="requests per real source (default 8)")
    p.add_argument("--train-corpus", default="none",
                   help="corpus train split for extra requests (default none; "
                        "data/corpus/train.jsonl as the shipped gate)")
    p.add_argument("--train-functions", type=int, default=0)
    p.add_argument("--holdout", default="", help="comma-separated sources to hold out: the proof")
    p.add_argument("--switch-cost", type=float, default=0.1,
                   help="the hysteresis of the saved gate (default 0.1, the shipped gate's)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from evals.span.evaluate import baseline_stats, gate_stats
    from evals.span.run import SpanConfig, load_pair, training_seqs
    from evals.span.score import token_texts
    from evals.span.train import train_gate
    from models.span.gates import get_gate
    from models.span.learned import LearnedGate
    from models.span.remote import MAX_TOPK

    if not 1 <= a.k <= MAX_TOPK:
        p.error(f"--k must be in 1..{MAX_TOPK} (what a completions request can ask for)")
    torch.set_num_threads(a.threads)
    cfg = SpanConfig(per_source=a.per_source, torch_threads=a.threads,
                     train_corpus=None if a.train_corpus == "none" else a.train_corpus,
                     train_functions=a.train_functions)
    pair = load_pair(cfg)
    text = token_texts(pair[0])
    t0 = time.perf_counter()
    seqs, files = training_seqs(cfg, pair, progress=False)
    t1 = time.perf_counter()
    proxy = proxy_seqs(seqs, pair, a.k, cfg.batch_size)
    t2 = time.perf_counter()
    n_tok = sum(len(s) for s in seqs)
    print(f"{len(seqs)} requests, {n_tok} answer tokens, {len({s.source for s in seqs})} sources; "
          f"scores (cache) {t1 - t0:.0f} s, top-{a.k} proxy {t2 - t1:.0f} s "
          f"({1e6 * (t2 - t1) / n_tok:.0f} us/token, both models)")
    # how close the proxy is to the entropy it stands for
    ent = np.concatenate([s.ent.ravel() for s in seqs])
    prx = np.concatenate([s.ent.ravel() for s in proxy])
    print(f"proxy vs entropy: mean {prx.mean():.3f} vs {ent.mean():.3f} nats, correlation "
          f"{np.corrcoef(prx, ent)[0, 1]:.3f}, proxy <= entropy at {np.mean(prx <= ent + 1e-4):.1%}")
    hold = {s for s in a.holdout.split(",") if s}
    if hold:
        unknown = hold - {s.source for s in seqs}
        if unknown:
            p.error(f"--holdout: unknown sources {sorted(unknown)}")
        train = [i for i, s in enumerate(seqs) if s.source not in hold]
        test = [i for i, s in enumerate(seqs) if s.source in hold]
        t3 = time.perf_counter()
        g_full = train_gate([seqs[i] for i in train], text)
        t4 = time.perf_counter()
        g_proxy = train_gate([proxy[i] for i in train], text)
        t5 = time.perf_counter()
        base = baseline_stats([seqs[i] for i in test])
        full = gate_stats({"learned, entropy": g_full, "copy-2": get_gate("copy-2")},
                          [seqs[i] for i in test], text)
        prox = gate_stats({f"learned, top-{a.k} proxy": g_proxy}, [proxy[i] for i in test], text)
        n_train = sum(len(seqs[i]) for i in train)
        print(f"\nheld out {sorted(hold)}: {len(test)} requests, "
              f"{sum(len(seqs[i]) for i in test)} tokens; trained on {len(train)} requests "
              f"({n_train} tokens) in {t4 - t3:.0f} s (entropy) and {t5 - t4:.0f} s (proxy)")
        for name, st in [("always-transformer", base["always-transformer"]),
                         ("mixture-50/50", base["mixture-50/50"]), *full.items(), *prox.items()]:
            sw = "" if name.startswith(("always", "mixture")) else \
                f"  switches/100 {100 * st.switches.sum() / st.n.sum():5.1f}"
            print(f"  {name:28s} {pooled(st):.4f} nats/token{sw}")
        return 0
    gate = train_gate(proxy, text, meta={
        "entropy": f"topk:{a.k}", "trained_on": files, "per_source": a.per_source,
        "command": "python -m evals.span.topk " + " ".join(sys.argv[1:] if argv is None else argv)})
    gate = LearnedGate(gate.weights, gate.threshold, gate.meta, trees=gate.trees,
                       switch_cost=a.switch_cost)
    print(f"saved {gate.save(a.out)} ({time.perf_counter() - t2:.0f} s to train)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
