"""``archroute bench ray``: the router on Ray Serve (``serve --ray``) against the same router
in one process, on the same settings: start-up time (command to ``/ready``), the latency a
request gains (sequential, p50/p90), and throughput at ``--concurrency`` with 1 and with 2
replicas of each model deployment (and of the span pair's). Prints a table and ratios.

Each server runs alone, one after the other, on configs/router-ray.yaml's backends and
profiles with the replica counts of the row (1 router replica). On a shared or small
machine the figures are indicative only: say so where they are quoted.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from evals.bench.router_overhead import _pct, _port, _wait

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "router-ray.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(CONFIG),
                   help="settings whose backends and profiles are served (default: %(default)s)")
    p.add_argument("--model", default="archroute-auto",
                   help="the model (profile or backend) requests ask for (default: %(default)s)")
    p.add_argument("--requests", type=int, default=40,
                   help="sequential requests for the latency (default: %(default)s)")
    p.add_argument("--load", type=int, default=96,
                   help="requests of the throughput run (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="default: %(default)s")
    p.add_argument("--max-tokens", type=int, default=8, help="default: %(default)s")
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds a server may take to be ready (default: %(default)s)")


@dataclass
class Row:
    name: str
    ray: bool
    replicas: int
    start_s: float = float("nan")
    latencies_ms: list[float] = field(default_factory=list)
    rps: float = float("nan")
    failed: int = 0


def _settings(base: dict, ray: bool, replicas: int, tmp: Path) -> Path:
    import yaml

    cfg = dict(base)
    cfg["router_replicas"] = 1
    cfg["decision_log"] = str(tmp / f"decisions-{int(ray)}-{replicas}.sqlite")
    for b in cfg["backends"].values():
        b["replicas"] = replicas
        b.pop("max_replicas", None)
    cfg.setdefault("ray", {})["span_replicas"] = replicas
    path = tmp / f"router-{int(ray)}-{replicas}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one(url: str, model: str, max_tokens: int, i: int) -> tuple[bool, float]:
    import httpx

    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": model, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": f"Write a list of {i % 7 + 2} fruits."}]})
    return r.status_code == 200, (time.perf_counter() - t0) * 1000


def measure(row: Row, config: Path, args: argparse.Namespace) -> None:
    port = _port()
    cmd = [sys.executable, "-m", "router.cli", "serve", "--config", str(config),
           "--port", str(port)] + (["--ray"] if row.ray else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc, "/ready", args.start_timeout)
        row.start_s = time.perf_counter() - t0
        for i in range(3):  # warm-up
            _one(url, args.model, args.max_tokens, i)
        for i in range(args.requests):
            ok, ms = _one(url, args.model, args.max_tokens, i)
            row.failed += not ok
            row.latencies_ms.append(ms)
        t1 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            done = list(pool.map(lambda i: _one(url, args.model, args.max_tokens, i),
                                 range(args.load)))
        row.rps = args.load / (time.perf_counter() - t1)
        row.failed += sum(not ok for ok, _ in done)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def report(rows: list[Row], args: argparse.Namespace) -> str:
    base = rows[0]
    p50 = statistics.median(base.latencies_ms)
    lines = [f"archroute bench ray: model {args.model}, max_tokens {args.max_tokens}, "
             f"{args.requests} sequential requests, {args.load} at concurrency "
             f"{args.concurrency}; {os.cpu_count()} CPUs",
             f"{'server':<34} {'start s':>8} {'p50 ms':>8} {'p90 ms':>8} {'added p50':>10} "
             f"{'req/s':>7} {'x single':>9} {'failed':>6}"]
    for r in rows:
        mid = statistics.median(r.latencies_ms)
        lines.append(f"{r.name:<34} {r.start_s:>8.1f} {mid:>8.1f} "
                     f"{_pct(r.latencies_ms, 0.9):>8.1f} {mid - p50:>+10.1f} {r.rps:>7.2f} "
                     f"{r.rps / base.rps:>9.2f} {r.failed:>6}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import yaml

    base = yaml.safe_load(Path(args.config).read_text())
    rows = [Row("one process (archroute serve)", False, 1),
            Row("Ray Serve, 1 replica per model", True, 1),
            Row("Ray Serve, 2 replicas per model", True, 2)]
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            print(f"bench ray: {row.name} ...", file=sys.stderr, flush=True)
            measure(row, _settings(base, row.ray, row.replicas, Path(tmp)), args)
    print(report(rows, args))
    return 0 if not any(r.failed for r in rows) else 1
