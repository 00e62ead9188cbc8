"""``archroute bench router``: the latency the router adds, and its requests/s.

Starts, on loopback only, an upstream that answers instantly (``archroute serve-model fake``)
and a router whose two backends both point at it; with ``--peer litellm`` also LiteLLM's
proxy (from ``.venv-litellm``, made by ``scripts/litellm-env``) with one model on the same
upstream (provider ``openai/``, ``api_base`` the upstream). Then, for the upstream called
directly, the router and the peer, one after the other under the same load:

1. latency: ``--requests`` sequential chat requests to each (after ``--warmup`` each), one
   to each in turn; p50/p99, and what each proxy adds over calling the upstream directly;
2. CPU: each proxy process's CPU time (user + system, its whole process tree) per request
   over the sequential phase, a figure that other load on the machine does not inflate;
3. throughput: ``--requests`` requests to each at ``--concurrency`` in flight, in five bursts
   taken in turn; requests/s, and each proxy's share of the direct figure.

Every loop is bounded; every server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "Repeat this exactly: the quick brown fox jumps over "
                                         "the lazy dog. " * 4}]
PEERS = ("litellm",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=400, help="requests per measurement")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured requests first")
    p.add_argument("--concurrency", type=int, default=16, help="in flight for requests/s")
    p.add_argument("--model", default="archroute-rules",
                   help="router profile to use (archroute-auto uses the classifier)")
    p.add_argument("--decision-log", action="store_true",
                   help="keep the SQLite decision log on (off by default)")
    p.add_argument("--peer", choices=PEERS, default=None,
                   help="also measure this proxy on the same upstream and load (litellm: "
                        "LiteLLM's proxy from .venv-litellm, made by scripts/litellm-env)")


@dataclass
class Target:
    """One thing under load: its label, base URL, the model name it is sent, and the
    process whose CPU is counted (None: the upstream itself)."""

    label: str
    url: str
    model: str
    proc: subprocess.Popen | None = None
    latencies: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)  # x-archroute-overhead-ms values
    cpu_ms: float = float("nan")
    rps: float = float("nan")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _archroute(args: list[str], port: int) -> subprocess.Popen:
    return _start([sys.executable, "-m", "router.cli", *args, "--port", str(port)])


def _litellm(upstream: str, port: int, tmp: Path) -> tuple[subprocess.Popen, str]:
    """LiteLLM's proxy on ``port`` with one model, ``instant``, on ``upstream``; and its
    version. Raises SystemExit with what to run when ``.venv-litellm`` is missing."""
    import yaml

    venv = ROOT / os.environ.get("ARCHROUTE_LITELLM_VENV", ".venv-litellm")
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        raise SystemExit(f"--peer litellm: {exe} not found; run scripts/litellm-env first")
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    cfg = tmp / "litellm.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "instant", "litellm_params": {
            "model": "openai/instant", "api_base": upstream + "/v1", "api_key": "none"}}],
        "litellm_settings": {"telemetry": False},
        # no auth, as the router here: loopback only, and a like-for-like comparison
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True}}))
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "PYTHONPATH": ""}  # its own environment only
    proc = _start([str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                   "--num_workers", "1"], env)
    return proc, version


def _wait(url: str, proc: subprocess.Popen, path: str = "/health",
          timeout_s: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.args!r}")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not up within {timeout_s} s")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` and its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu s)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo += [c for c, (parent, _) in stats.items() if parent == p]
    return total


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _latencies(targets: list[Target], n: int, warmup: int) -> None:
    """Sequential request latencies (ms) into each target's ``latencies``, one request to
    each target in turn (so a change in the machine's other load falls on all of them); the
    CPU of each proxy process per request over them into its ``cpu_ms``."""
    import httpx

    clients = [httpx.Client(base_url=t.url, timeout=30) for t in targets]
    cpu0 = [_cpu_s(t.proc.pid) if t.proc is not None else 0.0 for t in targets]
    try:
        for i in range(warmup + n):
            for t, c in zip(targets, clients, strict=True):
                body = {"model": t.model, "messages": MESSAGES, "max_tokens": 16}
                start = time.perf_counter()
                r = c.post("/v1/chat/completions", json=body)
                dt = (time.perf_counter() - start) * 1000
                r.raise_for_status()
                if i >= warmup:
                    t.latencies.append(dt)
                    if "x-archroute-overhead-ms" in r.headers:
                        t.overhead.append(float(r.headers["x-archroute-overhead-ms"]))
    finally:
        for c in clients:
            c.close()
    for t, c0 in zip(targets, cpu0, strict=True):
        if t.proc is not None:
            t.cpu_ms = (_cpu_s(t.proc.pid) - c0) * 1000 / (n + warmup)


async def _burst(t: Target, n: int, concurrency: int) -> float:
    """Seconds to serve ``n`` requests at ``concurrency`` in flight."""
    import httpx

    body = {"model": t.model, "messages": MESSAGES, "max_tokens": 16}
    left = n
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=t.url, timeout=60, limits=limits) as c:
        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                (await c.post("/v1/chat/completions", json=body)).raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


def _throughput(targets: list[Target], n: int, concurrency: int, rounds: int = 5) -> None:
    """Requests/s of each target: ``n`` requests each, in ``rounds`` bursts taken in turn
    (the order rotating), so that other load falls on all of them alike."""
    seconds = [0.0] * len(targets)
    per = max(1, n // rounds)
    for r in range(rounds):
        for k in range(len(targets)):
            i = (k + r) % len(targets)
            seconds[i] += asyncio.run(_burst(targets[i], per, concurrency))
    for t, sec in zip(targets, seconds, strict=True):
        t.rps = per * rounds / sec


def run(args: argparse.Namespace) -> int:
    import yaml

    up_port, router_port, peer_port = _port(), _port(), _port()
    up_url = f"http://127.0.0.1:{up_port}"
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "backends": {role: {"name": f"bench-{role}", "kind": "upstream",
                                "base_url": up_url + "/v1", "model": "instant"}
                         for role in ("transformer", "hybrid")},
            "decision_log": str(Path(tmp) / "d.sqlite") if args.decision_log else None,
        }
        cfg = Path(tmp) / "bench.yaml"
        cfg.write_text(yaml.safe_dump(config))
        try:
            up = _archroute(["serve-model", "fake", "--name", "instant", "--fake-reply",
                             "ok " * 16], up_port)
            router = _archroute(["serve", "--config", str(cfg)], router_port)
            procs += [up, router]
            targets = [Target("upstream direct", up_url, "instant"),
                       Target(f"ArchRoute ({args.model})", f"http://127.0.0.1:{router_port}",
                              args.model, router)]
            waits = [(up_url, up, "/health"), (targets[1].url, router, "/health")]
            if args.peer == "litellm":
                peer, version = _litellm(up_url, peer_port, Path(tmp))
                procs.append(peer)
                targets.append(Target(f"LiteLLM {version}", f"http://127.0.0.1:{peer_port}",
                                      "instant", peer))
                waits.append((targets[2].url, peer, "/health/liveliness"))
            for url, proc, path in waits:
                _wait(url, proc, path)
            _latencies(targets, args.requests, args.warmup)
            _throughput(targets, args.requests, args.concurrency)
        finally:
            for p in procs:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    print(report(targets, args))
    return 0


def report(targets: list[Target], args: argparse.Namespace) -> str:
    """The table: latency, what each proxy adds, its CPU per request, requests/s."""
    direct = targets[0]
    d50, d99 = _pct(direct.latencies, .5), _pct(direct.latencies, .99)
    lines = [f"router overhead: {args.requests} sequential chat requests after {args.warmup} "
             f"warm-up, then {args.requests} at concurrency {args.concurrency}; router "
             f"profile {args.model}, decision log {'on' if args.decision_log else 'off'}; "
             f"aiohttp {importlib.metadata.version('aiohttp')}",
             f"{'':32}{'p50 ms':>8}{'p99 ms':>8}{'added p50':>11}{'added p99':>11}"
             f"{'CPU ms/req':>12}{'req/s':>8}{'of direct':>11}"]
    for t in targets:
        p50, p99 = _pct(t.latencies, .5), _pct(t.latencies, .99)
        added = (f"{p50 - d50:11.2f}{p99 - d99:11.2f}" if t is not direct else f"{'':22}")
        cpu = f"{t.cpu_ms:12.2f}" if t.proc is not None else f"{'':12}"
        lines.append(f"{t.label:32}{p50:8.2f}{p99:8.2f}{added}{cpu}{t.rps:8.0f}"
                     f"{t.rps / direct.rps:11.0%}")
    for t in targets:
        if t.overhead:
            lines.append(f"{'  x-archroute-overhead-ms':32}{_pct(t.overhead, .5):8.2f}"
                         f"{_pct(t.overhead, .99):8.2f}  (the router's own measure)")
    if len(targets) > 2:
        ours, peer = (_pct(t.latencies, .5) - d50 for t in targets[1:3])
        lines.append(f"ArchRoute's added p50 is {ours / peer:.2f}x {targets[2].label}'s")
    return "\n".join(lines)
