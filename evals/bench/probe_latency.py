"""``archroute bench route --probe``: what the prompt probe adds per request (issue #24
item 4), on the embedded pair in-process.

A ``probe`` profile asks both backends for the prompt's log-probabilities (one prefill
each, concurrently, through their slots: :func:`router.probing.measure`) before it scores.
For prompts of ``--probe-lengths`` tokens (corpus text) this prints, p50 over
``--probe-requests`` calls after one warm-up: each model's prefill alone, the probe as the
router runs it (both prefills and the features), and the added cost: two prefills per
request (the probe's cache is not reused for generation yet, so the chosen model reads the
prompt again) in GFLOPs from the pair's cost model. Indicative: a shared CPU, one torch
thread per model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from evals.bench.classifier_latency import bench_text


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", action="store_true",
                   help="instead: what the prompt probe adds per request on the embedded pair "
                        "(both models' prefill, in-process)")
    p.add_argument("--probe-lengths", default="128,512,1024",
                   help="--probe: prompt lengths in tokens (at most the pair's context)")
    p.add_argument("--probe-requests", type=int, default=5, help="--probe: timed calls per length")


def run_probe(args: argparse.Namespace) -> int:
    import torch

    from models.base import TokenIds
    from models.reference_pair import load_reference_pair
    from router.pool import BackendSlot, SlotLimits
    from router.probing import measure

    torch.set_num_threads(1)
    t, h = load_reference_pair(torch_threads=1)
    slots = {"transformer": BackendSlot("transformer", t, SlotLimits(timeout_s=600)),
             "hybrid": BackendSlot("hybrid", h, SlotLimits(timeout_s=600))}
    costs = {"transformer": t.cost_model(), "hybrid": h.cost_model()}
    text_ids = t.encode(bench_text(8 * max(int(x) for x in args.probe_lengths.split(",")),
                                   args.corpus))
    print(f"the prompt probe on the embedded pair, in-process (1 torch thread per model, "
          f"{os.cpu_count()} CPUs, shared: indicative), p50 of {args.probe_requests} calls")
    print(f"{'tokens':>7}{'T prefill ms':>14}{'H prefill ms':>14}{'probe ms':>10}"
          f"{'added GFLOP':>13}")

    async def timed(call) -> float:
        t0 = time.perf_counter()
        await call()
        return (time.perf_counter() - t0) * 1000

    async def main() -> None:
        for n in (int(x) for x in args.probe_lengths.split(",")):
            n = min(n, t.context_length)
            prompt = TokenIds((t.prefix_id, *text_ids[:n - 1]))
            rows: dict[str, list[float]] = {"t": [], "h": [], "probe": []}
            for i in range(args.probe_requests + 1):
                got = {"t": await timed(lambda p=prompt: slots["transformer"].score_prompt(p)),
                       "h": await timed(lambda p=prompt: slots["hybrid"].score_prompt(p))}
                outcome = await measure(slots, prompt, timeout_s=600)
                if outcome.features is None:
                    raise SystemExit(f"the probe failed: {outcome.failure}: {outcome.detail}")
                got["probe"] = outcome.ms
                if i:  # the first call warms up
                    for k, v in got.items():
                        rows[k].append(v)
            flops = sum(c.prefill_flops(n) for c in costs.values() if c is not None) / 1e9
            print(f"{n:>7}{statistics.median(rows['t']):14.1f}{statistics.median(rows['h']):14.1f}"
                  f"{statistics.median(rows['probe']):10.1f}{flops:13.3f}")

    asyncio.run(main())
    return 0
