"""``archroute bench router``: the latency the router adds, and its requests/s.

Starts, on loopback only, an upstream that answers instantly (``archroute serve-model fake``)
and a router whose two backends both point at it. Then:

1. latency: ``--requests`` sequential chat requests straight to the upstream and the same
   through the router (after ``--warmup`` each); prints p50/p99 of both and the difference;
2. throughput: ``--requests`` requests through the router at ``--concurrency`` in flight;
   prints requests/s (and the upstream's own, for scale), and the router process's CPU time
   per request, a figure that other load on the machine does not inflate.

Every loop is bounded; both servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "Repeat this exactly: the quick brown fox jumps over "
                                         "the lazy dog. " * 4}]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=400, help="requests per measurement")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured requests first")
    p.add_argument("--concurrency", type=int, default=16, help="in flight for requests/s")
    p.add_argument("--model", default="archroute-rules",
                   help="router profile to use (archroute-auto uses the classifier)")
    p.add_argument("--decision-log", action="store_true",
                   help="keep the SQLite decision log on (off by default)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "router.cli", *args, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.args!r}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not up within {timeout_s} s")


def _cpu_s(proc: subprocess.Popen) -> float:
    """User + system CPU seconds the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _latencies(url: str, model: str, n: int, warmup: int) -> tuple[list[float], list[float]]:
    """Sequential request latencies (ms) and the router's x-archroute-overhead-ms values."""
    import httpx

    body = {"model": model, "messages": MESSAGES, "max_tokens": 16}
    out, overhead = [], []
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(warmup + n):
            t = time.perf_counter()
            r = c.post("/v1/chat/completions", json=body)
            dt = (time.perf_counter() - t) * 1000
            r.raise_for_status()
            if i >= warmup:
                out.append(dt)
                if "x-archroute-overhead-ms" in r.headers:
                    overhead.append(float(r.headers["x-archroute-overhead-ms"]))
    return out, overhead


async def _throughput(url: str, model: str, n: int, concurrency: int) -> float:
    import httpx

    body = {"model": model, "messages": MESSAGES, "max_tokens": 16}
    left = n
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                (await c.post("/v1/chat/completions", json=body)).raise_for_status()

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - t)


def run(args: argparse.Namespace) -> int:
    import yaml

    up_port, router_port = _port(), _port()
    up_url, router_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{router_port}"
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "backends": {role: {"name": f"bench-{role}", "kind": "upstream",
                                "base_url": up_url + "/v1", "model": "instant"}
                         for role in ("transformer", "hybrid")},
            "decision_log": str(Path(tmp) / "d.sqlite") if args.decision_log else None,
        }
        cfg = Path(tmp) / "bench.yaml"
        cfg.write_text(yaml.safe_dump(config))
        up = _start(["serve-model", "fake", "--name", "instant", "--fake-reply",
                     "ok " * 16], up_port)
        router = _start(["serve", "--config", str(cfg)], router_port)
        try:
            _wait(up_url, up)
            _wait(router_url, router)
            direct, _ = _latencies(up_url, "instant", args.requests, args.warmup)
            cpu0 = _cpu_s(router)
            routed, overhead = _latencies(router_url, args.model, args.requests, args.warmup)
            cpu_ms = (_cpu_s(router) - cpu0) * 1000 / (args.requests + args.warmup)
            rps_router = asyncio.run(_throughput(router_url, args.model, args.requests,
                                                 args.concurrency))
            rps_direct = asyncio.run(_throughput(up_url, "instant", args.requests,
                                                 args.concurrency))
        finally:
            for p in (router, up):
                p.terminate()
                p.wait(10)
    print(f"router overhead: {args.requests} sequential chat requests after {args.warmup} "
          f"warm-up, profile {args.model}, decision log {'on' if args.decision_log else 'off'}")
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'upstream direct':24}{_pct(direct, .5):10.2f}{_pct(direct, .99):10.2f}")
    print(f"{'through the router':24}{_pct(routed, .5):10.2f}{_pct(routed, .99):10.2f}")
    print(f"{'added by the router':24}{_pct(routed, .5) - _pct(direct, .5):10.2f}"
          f"{_pct(routed, .99) - _pct(direct, .99):10.2f}")
    if overhead:
        print(f"{'x-archroute-overhead-ms':24}{statistics.median(overhead):10.2f}"
              f"{_pct(overhead, .99):10.2f}")
    print(f"router CPU per request: {cpu_ms:.2f} ms (user + system, whole process)")
    print(f"requests/s at concurrency {args.concurrency}: router {rps_router:.0f}, "
          f"upstream direct {rps_direct:.0f}")
    return 0
