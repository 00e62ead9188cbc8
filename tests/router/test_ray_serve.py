"""``archroute serve --ray`` on a real local Ray cluster (the `ray` extra), one process for
the module: the shipped configs/router-ray.yaml on the embedded pair, scaled to this
machine (1 router replica, 2 transformer replicas, the hybrid autoscaling from 1 to 2, one
span replica). The official openai SDK through it; a transformer replica SIGKILLed under
load costs no request; the hybrid scaled 1 -> 2 by Ray Serve under load loses nothing; once
stopped, nothing the command started is left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from models.span.decoder import default_gate_name
from tests.router.servers import ROOT, free_port, reference_available

pytest.importorskip("ray.serve", reason="the `ray` extra is not installed")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not reference_available(), reason="no embedded pair")]

START_TIMEOUT_S = 300  # 5 replicas import torch on a 2-core machine shared with others


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            out[p] = (Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
                      .decode(errors="replace"))
        except OSError:
            continue
        todo.extend(children.get(p, []))
    return out


def replicas(pid: int, deployment: str) -> list[int]:
    """The live replica processes of ``deployment`` started by the command ``pid``."""
    tag = f"ServeReplica:archroute:{deployment}"
    return [p for p, cmd in descendants(pid).items()
            if tag in cmd and Path(f"/proc/{p}/status").exists()
            and "zombie" not in Path(f"/proc/{p}/status").read_text()]


class RayRouter:
    """``python -m router.cli serve --ray --config CONFIG --port P`` until :meth:`stop`."""

    def __init__(self, config: dict, tmp: Path, env: dict[str, str] | None = None) -> None:
        (tmp / "router.yaml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "router.log"
        env_over = env
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        env.pop("RAY_ADDRESS", None)  # a local cluster, unless ``env`` names one
        env.update(env_over or {})
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "router.cli", "serve", "--ray", "--config",
                 str(tmp / "router.yaml"), "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve --ray exited {self.proc.returncode}:\n"
                                   + self.log.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/ready", timeout=2.0).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"serve --ray not ready in {START_TIMEOUT_S} s:\n"
                           + self.log.read_text()[-3000:])

    def stop(self) -> dict[int, str]:
        """SIGTERM; returns what was still running below it once it exited."""
        below = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        time.sleep(1.0)
        return {p: cmd for p, cmd in below.items() if Path(f"/proc/{p}").exists()
                and "zombie" not in Path(f"/proc/{p}/status").read_text()}


def ray_config(tmp: Path) -> dict:
    """configs/router-ray.yaml scaled to this machine's test budget."""
    cfg = yaml.safe_load((ROOT / "configs" / "router-ray.yaml").read_text())
    cfg["router_replicas"] = 1
    cfg["backends"]["transformer"]["replicas"] = 2
    cfg["backends"]["hybrid"]["replicas"] = 1
    cfg["backends"]["hybrid"]["max_replicas"] = 2
    cfg["ray"]["span_replicas"] = 1
    # scale the hybrid up as soon as more than one request per replica waits
    cfg["ray"]["autoscaling"] = {"target_ongoing_requests": 1, "upscale_delay_s": 1,
                                 "downscale_delay_s": 600, "look_back_period_s": 2}
    cfg["decision_log"] = str(tmp / "decisions.sqlite")
    return cfg


@pytest.fixture(scope="module")
def ray_router(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ray")
    router = RayRouter(ray_config(tmp), tmp)
    try:
        router.wait_ready()
        yield router
    finally:
        router.stop()


def chat(url: str, model: str, i: int) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": f"Count to {i}"}]})


def load(url: str, model: str, n: int, concurrency: int, during=None) -> list[httpx.Response]:
    """``n`` chats at ``concurrency``; ``during()`` runs once a quarter of them answered."""
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(chat, url, model, i) for i in range(n)]
        if during is not None:
            while sum(f.done() for f in futures) < n // 4:
                time.sleep(0.05)
            during()
        return [f.result() for f in futures]


def test_openai_sdk_through_ray_serve(ray_router: RayRouter) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=ray_router.url + "/v1", api_key="unused", max_retries=0)
    for model in ("archroute", "archroute-span"):
        raw = client.chat.completions.with_raw_response.create(
            model=model, max_tokens=6, temperature=0,
            messages=[{"role": "user", "content": "Say hello"}])
        whole = raw.parse()
        assert whole.choices[0].message.content
        assert raw.headers["x-archroute-replica"]
        assert raw.headers["x-archroute-backend"] == f"span:{default_gate_name()}"  # the span deployment
        assert "x-archroute-span" in raw.headers
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, max_tokens=6, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Say hello"}]) if c.choices]
        assert "".join(pieces) == whole.choices[0].message.content  # greedy: the same answer
    auto = client.chat.completions.with_raw_response.create(
        model="archroute-auto", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert auto.headers["x-archroute-backend"] in ("reference-transformer", "reference-hybrid")
    ready = httpx.get(ray_router.url + "/ready").json()
    assert ready["ready"] and f"span:{default_gate_name()}" in ready["backends"]
    assert "archroute_requests" in httpx.get(ray_router.url + "/metrics").text


def test_hybrid_scales_1_to_2_under_load_losing_nothing(ray_router: RayRouter) -> None:
    pid = ray_router.proc.pid
    assert len(replicas(pid, "hybrid")) == 1
    answers: list[httpx.Response] = []
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        answers += load(ray_router.url, "reference-hybrid", 64, 16)
        if len(replicas(pid, "hybrid")) == 2:
            answers += load(ray_router.url, "reference-hybrid", 64, 16)  # served by both
            break
    assert len(replicas(pid, "hybrid")) == 2
    assert {r.status_code for r in answers} == {200}


def test_200_concurrent_chats(ray_router: RayRouter) -> None:
    answers = load(ray_router.url, "archroute-auto", 200, 200)
    assert [r.status_code for r in answers] == [200] * 200


def test_sigkill_of_a_model_replica_costs_no_request(ray_router: RayRouter) -> None:
    pid = ray_router.proc.pid
    before = replicas(pid, "transformer")
    assert len(before) == 2
    killed: list[int] = []

    def kill_one() -> None:
        killed.append(before[0])
        os.kill(before[0], signal.SIGKILL)

    # named backend: no fallback to the hybrid, so every answer is a transformer replica's
    answers = load(ray_router.url, "reference-transformer", 200, 16, during=kill_one)
    assert killed
    assert [r.status_code for r in answers] == [200] * 200
    assert all("x-archroute-fallback" not in r.headers for r in answers)
    deadline = time.monotonic() + 120  # Ray Serve replaces the lost replica
    while time.monotonic() < deadline and len(replicas(pid, "transformer")) < 2:
        time.sleep(1)
    now = replicas(pid, "transformer")
    assert len(now) == 2 and before[0] not in now


def test_stop_leaves_no_ray_process(tmp_path: Path, ray_router: RayRouter) -> None:
    """Last in the module: stops the module's router and checks what is left."""
    assert descendants(ray_router.proc.pid)  # the cluster runs below the command
    left = ray_router.stop()
    assert ray_router.proc.returncode == 0, ray_router.log.read_text()[-2000:]
    assert left == {}
