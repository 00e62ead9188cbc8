"""``archroute bench handoff``: what a conversation's switch of backend costs, and the
``conversation.handoff_cost`` default it gives (router/conversations.py, docs/router.md
"Conversations").

A backend that served a conversation's earlier turns holds them in its prefix cache; the
other backend must read them all again (prefill) before it can answer. Per backend of the
embedded pair, at conversation lengths L (256, 512, 1024 tokens): the prefill of L tokens
(one forward, no cache: what a switch adds) and the decode time per token with a cache of L
(what the answer itself costs). A switch to backend B lengthens the turn by
``prefill_B(L) / (T * decode_B)``, T the answer's tokens (``--answer-tokens``).

The unit the router compares is nats/token of the answer (the policy's predicted gain,
:meth:`router.policies.Policy.gain`). The exchange rate: a switch that doubles a turn's
latency is worth the labels' tie margin (the shipped classifier's ``margin``, 0.05
nats/token: a gap smaller than that is a tie in its labels), so the cost of a switch is
``margin * prefill_B(L) / (T * decode_B)`` nats/token, and per 1,000 tokens of conversation
(the setting's unit) that times ``1000 / L``. The default is the mean over both directions
at the longest length. Figures, not a test; one torch thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import statistics
import time

DEFAULT_LENGTHS = "256,512,1024"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="conversation lengths (tokens)")
    p.add_argument("--answer-tokens", type=int, default=256,
                   help="T: the answer's tokens a turn decodes (the latency a switch adds to)")
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _past(res):
    return getattr(res, "cache", None) or res.past_key_values


def measure(backend, length: int, steps: int, repeats: int) -> tuple[float, float]:
    """(prefill seconds for ``length`` tokens, decode seconds per token after them)."""
    import torch

    vocab = int(getattr(backend.tokenizer, "vocab_size", 1000))
    dev = backend.device
    ids = torch.tensor([[(7 * i + 3) % (vocab - 2) + 2 for i in range(length)]], device=dev)
    model, kw = backend.model, backend.cache_kw
    prefill, decode = [], []
    with torch.no_grad():
        model(input_ids=ids[:, :16], use_cache=True)  # warm-up
        for _ in range(repeats):
            _sync(dev)
            t = time.perf_counter()
            past = _past(model(input_ids=ids, use_cache=True))
            _sync(dev)
            prefill.append(time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(steps):
                past = _past(model(input_ids=ids[:, -1:], use_cache=True, **{kw: past}))
            _sync(dev)
            decode.append((time.perf_counter() - t) / steps)
    return statistics.median(prefill), statistics.median(decode)


def run(a: argparse.Namespace) -> int:
    import torch

    from classifiers.artifact import load_default
    from models.registry import REFERENCE_SPECS, from_spec

    torch.set_num_threads(a.threads)
    margin = float(load_default().meta.get("margin", 0.05))
    lengths = [int(x) for x in a.lengths.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {a.device}; "
          f"answer T = {a.answer_tokens} tokens, tie margin {margin:g} nats/token")
    print(f"{'switch to':12s} {'L':>5s} {'prefill s':>10s} {'ms/token':>9s} {'decode ms/tok':>14s} "
          f"{'added':>7s} {'nats/token':>11s} {'per 1k tok':>11s}")
    per_k: dict[int, list[float]] = {n: [] for n in lengths}
    for role, spec in REFERENCE_SPECS.items():
        b = from_spec(spec, role, device=a.device, torch_threads=a.threads)
        for n in lengths:
            pre, dec = measure(b, n, a.decode_steps, a.repeats)
            added = pre / (a.answer_tokens * dec)  # the turn's latency, relatively
            cost = margin * added
            per_k[n].append(cost * 1000 / n)
            print(f"{role:12s} {n:5d} {pre:10.3f} {1000 * pre / n:9.3f} {1000 * dec:14.2f} "
                  f"{added:6.1%} {cost:11.4f} {cost * 1000 / n:11.4f}")
        del b
    default = statistics.mean(per_k[lengths[-1]])
    print(f"handoff_cost (nats/token per 1,000 conversation tokens, mean of both directions "
          f"at L = {lengths[-1]}): {default:.4f}")
    return 0
