"""``archroute bench route``: how fast ``POST /v1/route`` answers (the decision alone, no
generation), through a real router process on loopback.

Starts a router whose two backends are instant fakes, then sends ``--requests`` sequential
``/v1/route`` calls per prompt length (a chat request of about ``tokens * 4`` characters of
corpus text with a one-line instruction) and prints p50/p99 of the client-measured latency
and of the router's own ``overhead_ms`` (routing and scoring). Figures, not a test.

``--probe``: instead, what the prompt probe of a ``probe`` profile adds per request on the
embedded pair (:mod:`evals.bench.probe_latency`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from evals.bench.classifier_latency import bench_text
from evals.bench.probe_latency import add_probe_arguments, run_probe
from evals.bench.router_overhead import _archroute, _pct, _port, _wait


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="512,2048,8192", help="prompt lengths in tokens")
    p.add_argument("--requests", type=int, default=300, help="timed calls per length")
    p.add_argument("--warmup", type=int, default=30, help="unmeasured calls first")
    p.add_argument("--model", default="archroute", help="profile to ask for (default profile)")
    p.add_argument("--corpus", default="data/corpus", help="text source (synthetic if missing)")
    add_probe_arguments(p)


def run(args: argparse.Namespace) -> int:
    import httpx
    import yaml

    if args.probe:
        return run_probe(args)

    port = _port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "route.yaml"
        cfg.write_text(yaml.safe_dump({
            "backends": {r: {"name": f"fake-{r}", "kind": "fake"} for r in ("transformer", "hybrid")},
            "decision_log": None}))
        proc = _archroute(["serve", "--config", str(cfg)], port)
        try:
            _wait(url, proc)
            print(f"POST /v1/route, profile {args.model}, {args.requests} sequential calls per "
                  f"length after {args.warmup} warm-up (pid {proc.pid}, {os.cpu_count()} CPUs)")
            print(f"{'tokens':>8}{'chars':>8}{'p50 ms':>9}{'p99 ms':>9}{'server p50':>12}"
                  f"{'decision':>13}")
            with httpx.Client(base_url=url, timeout=30) as c:
                for n in (int(x) for x in args.lengths.split(",")):
                    text = bench_text(n * 4, args.corpus)
                    body = {"model": args.model, "messages": [
                        {"role": "user", "content": "Summarize the following text.\n\n" + text}]}
                    lat, server = [], []
                    decision = ""
                    for i in range(args.warmup + args.requests):
                        t = time.perf_counter()
                        r = c.post("/v1/route", json=body)
                        dt = (time.perf_counter() - t) * 1000
                        r.raise_for_status()
                        if i >= args.warmup:
                            d = r.json()
                            lat.append(dt)
                            server.append(d["overhead_ms"])
                            decision = d["decision"]
                    print(f"{n:>8}{len(body['messages'][0]['content']):>8}{_pct(lat, .5):9.2f}"
                          f"{_pct(lat, .99):9.2f}{statistics.median(server):12.2f}{decision:>13}")
        finally:
            proc.terminate()
            proc.wait(10)
    return 0
