"""``archroute bench span-remote``: span decoding over two engine processes.

Starts ``archroute serve-model`` processes on loopback (the reference transformer and
hybrid, ``--threads`` torch threads each): one pair with prefix reuse off
(``model_server.prefix_cache: 0``, each span re-reads the whole sequence) and, per gate, one
with it on (the default: each engine resumes from the cache of its last span,
:mod:`models.prefix_cache`; a pair per gate, so that no configuration resumes from
another's answer). It decodes the prompts of ``archroute bench span`` greedily to
``--tokens`` tokens (``ignore_eos``): each engine alone (one streamed request), then
:class:`models.span.remote.RemoteSpanBackend` per gate on each pair (one request per span,
the stream closed when the gate switches), and the in-process span decoder in this process
for reference. Per configuration: tokens/s (time to the last token, prompt included), the
ratio to the transformer engine alone, requests per answer, switches and wasted tokens
(arrived after a switch, dropped) per 100 answer tokens, the mean time from a span's request
to its first token (what a switch costs), the tokens sent as prompts per answer and, of
them, those the engines computed (sent minus what their prefix caches served, from the
engines' ``/ready`` counters). Each repeat starts its prompts with its own line (``Run
N.``), the same for every configuration, so an engine never resumes from an earlier
repeat's answer. Figures, not a test: median of ``--repeats`` runs per prompt,
configurations interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from evals.bench.router_overhead import _port, _start, _wait
from evals.bench.span import PROMPTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=64, help="answer tokens per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per prompt (median)")
    p.add_argument("--gates", default="copy-2,copy-4",
                   help="comma-separated gates over tokens (default copy-2,copy-4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine (default 1)")


def run(a: argparse.Namespace) -> int:
    import httpx
    import torch

    from models.base import Backend, GenerationParams
    from models.reference_pair import load_reference
    from models.span.decoder import SpanBackend
    from models.span.remote import RemoteSpanBackend, RemoteTrace
    from models.upstream import OpenAIUpstreamBackend

    torch.set_num_threads(a.threads)
    gates = [g.strip() for g in a.gates.split(",") if g.strip()]
    procs, urls = [], {}
    try:
        # one pair without reuse (the engines alone and every gate), and one pair with reuse
        # per gate (so no configuration resumes from another's answer to the same prompt)
        for pair in ("off", *gates):
            env = {"ARCHROUTE_MODEL_SERVER__PREFIX_CACHE": "0"} if pair == "off" else {}
            for role in ("transformer", "hybrid"):
                port = _port()
                procs.append(_start([sys.executable, "-m", "router.cli", "serve-model",
                                     f"reference:{role}", "--name", role, "--torch-threads",
                                     str(a.threads), "--port", str(port)], env))
                urls[role, pair] = f"http://127.0.0.1:{port}"
        for url, proc in zip(urls.values(), procs, strict=True):
            _wait(url, proc)
        t = load_reference("transformer")
        h = load_reference("hybrid")

        def up(role: str, pair: str = "off") -> OpenAIUpstreamBackend:
            return OpenAIUpstreamBackend(role, urls[role, pair] + "/v1", role, timeout=120)

        def computed(pair: str) -> int:
            """Prompt tokens a reuse pair's engines computed so far (sent minus served)."""
            n = 0
            for role in ("transformer", "hybrid"):
                c = httpx.get(urls[role, pair] + "/ready").json()["prefix_cache"]
                n += c["prompt_tokens"] - c["reused_tokens"]
            return n

        params = GenerationParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
        configs: dict[str, Backend] = {"transformer engine alone": up("transformer"),
                                       "hybrid engine alone": up("hybrid")}
        pairs: dict[str, str] = {}  # configuration -> its reuse pair
        for g in gates:
            for reuse in ("off", "on"):
                pair = g if reuse == "on" else "off"
                cname = f"span-remote {g}, reuse {reuse}"
                configs[cname] = RemoteSpanBackend(
                    up("transformer", pair), up("hybrid", pair), t.tokenizer, g,
                    context_length=t.context_length)
                if reuse == "on":
                    pairs[cname] = pair
        for g in gates:
            configs[f"span in-process {g}"] = SpanBackend(t, h, g)
        print(f"torch {torch.__version__}, {a.threads} thread(s) per engine and here; "
              f"{len(PROMPTS)} prompts, {a.tokens} answer tokens each, greedy, eos ignored, "
              f"median of {a.repeats} runs, configurations interleaved; engines: serve-model "
              "processes on loopback, prefix reuse off (prefix_cache 0) and on (default, a "
              "pair per gate)")

        def once(cname: str, b: Backend, prompt: str) -> tuple[float, RemoteTrace | None, int, int]:
            tr = RemoteTrace() if isinstance(b, RemoteSpanBackend) else None
            pair = pairs.get(cname)
            before = computed(pair) if pair else 0
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
            seconds = time.perf_counter() - t0
            sent = sum(s.read for s in tr.spans) if tr is not None else 0
            return seconds, tr, r.completion_tokens, computed(pair) - before if pair else sent

        for cname, b in configs.items():  # warm-up
            once(cname, b, "Warm-up.\n" + PROMPTS["prose"])
        runs: dict[str, dict[str, list]] = {c: {p: [] for p in PROMPTS} for c in configs}
        for i in range(a.repeats):
            for pname, prompt in PROMPTS.items():
                for cname, b in configs.items():
                    runs[cname][pname].append(once(cname, b, f"Run {i + 1}.\n{prompt}"))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)

    median = {c: [sorted(rs, key=lambda r: r[0])[len(rs) // 2] for rs in by_p.values()]
              for c, by_p in runs.items()}
    tps = {c: sum(r[2] for r in med) / sum(r[0] for r in med) for c, med in median.items()}
    base = tps["transformer engine alone"]
    print(f"\n{'configuration':32s} {'tok/s':>7s} {'x T alone':>9s} {'req/answer':>10s} "
          f"{'switch/100':>10s} {'wasted/100':>10s} {'span TTFT ms':>12s} {'sent/answer':>11s} "
          f"{'computed/answer':>15s}")
    for cname, med in median.items():
        line = f"{cname:32s} {tps[cname]:7.1f} {tps[cname] / base:9.2f}"
        traces = [r[1] for r in med if r[1] is not None]
        if traces:
            n = sum(len(tr.token_ids) for tr in traces)
            spans = [s for tr in traces for s in tr.spans]
            ttft = statistics.median(1000 * s.first_token_s for s in spans if s.kept)
            line += (f" {len(spans) / len(traces):10.1f} {100 * sum(tr.switches for tr in traces) / n:10.1f}"
                     f" {100 * sum(s.wasted for s in spans) / n:10.1f} {ttft:12.1f}"
                     f" {sum(s.read for s in spans) / len(traces):11.0f}"
                     f" {sum(r[3] for r in med) / len(med):15.0f}")
        print(line)
    print("\nx T alone: tokens/s over the transformer engine alone's, same run. req/answer: "
          "requests per answer (one per span). wasted/100: tokens that reached the client after "
          "the gate had switched away (dropped), per 100 answer tokens; what an engine decodes "
          "before it notices the closed stream never reaches the client and is not counted. "
          "span TTFT: median time from a span's request to its first token (the price of a "
          "switch: connect, prefill, first step). sent: prompt tokens sent to the engines per "
          "answer over all its spans; computed: of them, those the engines prefilled (with "
          "reuse: sent minus what their prefix caches served, from /ready).")
    return 0
