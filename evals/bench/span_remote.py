"""``archroute bench span-remote``: span decoding over two engine processes.

Starts two ``archroute serve-model`` processes on loopback (the reference transformer and
hybrid, ``--threads`` torch threads each) and decodes the prompts of ``archroute bench
span`` greedily to ``--tokens`` tokens (``ignore_eos``): each engine alone (one streamed
request), then :class:`models.span.remote.RemoteSpanBackend` per gate (one request per span,
the stream closed when the gate switches), and the in-process span decoder in this process
for reference. Per configuration: tokens/s (time to the last token, prompt included), the
ratio to the faster engine alone, requests per answer, switches and wasted tokens (arrived
after a switch, dropped) per 100 answer tokens, the mean time from a span's request to its
first token (what a switch costs) and the tokens the engines re-read: ``serve-model`` has
no prefix cache, so every span request prefills the whole sequence again, which an engine
with prefix caching (vLLM APC, SGLang) would read from its cache. Figures, not a test:
median of ``--repeats`` runs per prompt, configurations interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from evals.bench.router_overhead import _archroute, _port, _wait
from evals.bench.span import PROMPTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=64, help="answer tokens per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per prompt (median)")
    p.add_argument("--gates", default="copy-2,copy-4",
                   help="comma-separated gates over tokens (default copy-2,copy-4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine (default 1)")


def run(a: argparse.Namespace) -> int:
    import torch

    from models.base import Backend, GenerationParams
    from models.reference_pair import load_reference
    from models.span.decoder import SpanBackend
    from models.span.remote import RemoteSpanBackend, RemoteTrace
    from models.upstream import OpenAIUpstreamBackend

    torch.set_num_threads(a.threads)
    procs, urls = [], {}
    try:
        for role in ("transformer", "hybrid"):
            port = _port()
            procs.append(_archroute(["serve-model", f"reference:{role}", "--name", role,
                                 "--torch-threads", str(a.threads)], port))
            urls[role] = f"http://127.0.0.1:{port}"
        for url, proc in zip(urls.values(), procs, strict=True):
            _wait(url, proc)
        t = load_reference("transformer")
        h = load_reference("hybrid")

        def up(role: str) -> OpenAIUpstreamBackend:
            return OpenAIUpstreamBackend(role, urls[role] + "/v1", role, timeout=120)

        gates = [g.strip() for g in a.gates.split(",") if g.strip()]
        params = GenerationParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
        configs: dict[str, Backend] = {"transformer engine alone": up("transformer"),
                                       "hybrid engine alone": up("hybrid")}
        for g in gates:
            configs[f"span-remote {g}"] = RemoteSpanBackend(
                up("transformer"), up("hybrid"), t.tokenizer, g, context_length=t.context_length)
        for g in gates:
            configs[f"span in-process {g}"] = SpanBackend(t, h, g)
        print(f"torch {torch.__version__}, {a.threads} thread(s) per engine and here; "
              f"{len(PROMPTS)} prompts, {a.tokens} answer tokens each, greedy, eos ignored, "
              f"median of {a.repeats} runs, configurations interleaved; engines: two "
              "serve-model processes on loopback (no prefix cache)")

        def once(b: Backend, prompt: str) -> tuple[float, RemoteTrace | None, int]:
            tr = RemoteTrace() if isinstance(b, RemoteSpanBackend) else None
            t0 = time.perf_counter()
            if isinstance(b, RemoteSpanBackend):
                r = b.generate(prompt, params, trace=tr)
            elif isinstance(b, OpenAIUpstreamBackend):
                async def go():
                    try:
                        return await b.agenerate(prompt, params)
                    finally:
                        await b.aclose()
                r = asyncio.run(go())
            else:
                r = b.generate(prompt, params)
            return time.perf_counter() - t0, tr, r.completion_tokens

        for b in configs.values():  # warm-up
            once(b, PROMPTS["prose"])
        runs: dict[str, dict[str, list]] = {c: {p: [] for p in PROMPTS} for c in configs}
        for _ in range(a.repeats):
            for pname, prompt in PROMPTS.items():
                for cname, b in configs.items():
                    runs[cname][pname].append(once(b, prompt))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)

    median = {c: [sorted(rs, key=lambda r: r[0])[len(rs) // 2] for rs in by_p.values()]
              for c, by_p in runs.items()}
    tps = {c: sum(n for _, _, n in med) / sum(s for s, _, _ in med) for c, med in median.items()}
    best = max(tps["transformer engine alone"], tps["hybrid engine alone"])
    print(f"\n{'configuration':28s} {'tok/s':>7s} {'x best':>7s} {'req/answer':>10s} "
          f"{'switch/100':>10s} {'wasted/100':>10s} {'span TTFT ms':>12s} {'re-read/answer':>14s}")
    for cname, med in median.items():
        line = f"{cname:28s} {tps[cname]:7.1f} {tps[cname] / best:7.2f}"
        traces = [tr for _, tr, _ in med if tr is not None]
        if traces:
            n = sum(len(tr.token_ids) for tr in traces)
            spans = [s for tr in traces for s in tr.spans]
            ttft = statistics.median(1000 * s.first_token_s for s in spans if s.kept)
            line += (f" {len(spans) / len(traces):10.1f} {100 * sum(tr.switches for tr in traces) / n:10.1f}"
                     f" {100 * sum(s.wasted for s in spans) / n:10.1f} {ttft:12.1f}"
                     f" {sum(s.read for s in spans) / len(traces):14.0f}")
        print(line)
    print("\nx best: tokens/s over the faster engine alone. req/answer: requests per answer (one "
          "per span). wasted/100: tokens that reached the client after the gate had switched "
          "away (dropped), per 100 answer tokens; what an engine decodes before it notices the "
          "closed stream never reaches the client and is not counted. span TTFT: median time from a span's request to "
          "its first token (the price of a switch: connect, prefill, first step). re-read: "
          "tokens the engines prefilled per answer over all its spans; with prefix caching "
          "only the tokens each engine skipped would be computed.")
    return 0
