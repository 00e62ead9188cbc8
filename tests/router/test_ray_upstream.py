"""``serve --ray`` joining a running cluster (``RAY_ADDRESS``; here one ``ray start --head
--block`` started by the test) with an upstream backend: the upstream stays HTTP (the router
replicas call a real ``serve-model`` process), the in-process one is a deployment (a fake,
so it starts in seconds). Both answer through Ray Serve's proxy; a second command on the
same cluster is refused without touching the first; stopping removes what the command
started (Serve, its replicas) and leaves the cluster running."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.router.servers import Server, free_port
from tests.router.test_ray_serve import RayRouter, descendants, replicas

pytest.importorskip("ray.serve", reason="the `ray` extra is not installed")
pytestmark = pytest.mark.slow


# the cluster's token (Ray 2.59+ starts clusters with token authentication): the head and
# the command get it from the environment, so no token file of the user's is touched
TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def ray_head(tmp: Path) -> tuple[subprocess.Popen, str]:
    """A one-node cluster of 2 CPUs in the foreground (``--block``), and its address."""
    port = free_port()
    ray = Path(sys.executable).parent / "ray"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", **TOKEN}
    env.pop("RAY_ADDRESS", None)
    with open(tmp / "head.log", "wb") as out:
        proc = subprocess.Popen(
            [str(ray), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
             "--include-dashboard=false", "--disable-usage-stats",
             "--ray-client-server-port", str(free_port()),
             "--dashboard-agent-listen-port", str(free_port())],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / "head.log").read_text()[-2000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    return proc, f"127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_joined_cluster_upstream_over_http_and_stop_leaves_the_cluster(tmp_path: Path) -> None:
    head, address = ray_head(tmp_path)
    port = free_port()
    engine = Server(["serve-model", "fake", "--name", "engine", "--fake-reply", "from the engine"],
                    port=port)
    cfg = {"router_replicas": 1, "decision_log": str(tmp_path / "d.sqlite"),
           "backends": {
               "transformer": {"name": "engine", "kind": "upstream", "model": "engine",
                               "base_url": f"http://127.0.0.1:{port}/v1"},
               "hybrid": {"name": "h-fake", "kind": "fake", "replicas": 2, "num_cpus": 0.1,
                          "fake_reply": "from a hybrid replica"}},
           "ray": {"router_num_cpus": 0.1}}
    router = second = None
    try:
        engine.wait_ready()
        router = RayRouter(cfg, tmp_path, env={"RAY_ADDRESS": address, **TOKEN})
        router.wait_ready()
        assert len(replicas(head.pid, "hybrid")) == 2  # placed on the joined cluster
        assert replicas(head.pid, "transformer") == [] and replicas(head.pid, "span") == []
        for model, reply in (("engine", "from the engine"), ("h-fake", "from a hybrid replica")):
            r = httpx.post(router.url + "/v1/chat/completions", timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == reply
            assert r.headers["x-archroute-backend"] == model
        assert set(httpx.get(router.url + "/ready").json()["backends"]) == {"engine", "h-fake"}
        # an upstream beside a deployment cannot span: no span deployment, and the built-in
        # span profile is not served (as in one process)
        assert "archroute-span" not in {m["id"] for m in
                                        httpx.get(router.url + "/v1/models").json()["data"]}
        # a second command on the same cluster: refused, the first one untouched
        other = tmp_path / "second"
        other.mkdir()
        second = RayRouter(cfg, other, env={"RAY_ADDRESS": address, **TOKEN})
        assert second.proc.wait(120) == 2
        assert "already runs on this cluster" in second.log.read_text()
        assert httpx.post(router.url + "/v1/chat/completions", timeout=60, json={
            "model": "h-fake", "messages": [{"role": "user", "content": "hi"}]}
            ).status_code == 200
        router.stop()
        assert router.proc.returncode == 0
        assert head.poll() is None  # the cluster it joined keeps running...
        left = " ".join(descendants(head.pid).values())
        assert "ServeReplica" not in left and "ServeController" not in left  # ...without it
    finally:
        for r in (second, router):
            if r is not None:
                r.stop()
        engine.stop()
        stop(head)
