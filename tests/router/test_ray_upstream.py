"""``serve --ray`` with an upstream backend: the upstream stays HTTP (the router replicas
call a real ``serve-model`` process), the in-process one is a deployment (a fake here, so
the cluster starts in seconds). Both answer through Ray Serve's proxy; stopping leaves
nothing running."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.router.servers import Server, free_port
from tests.router.test_ray_serve import RayRouter, replicas

pytest.importorskip("ray.serve", reason="the `ray` extra is not installed")
pytestmark = pytest.mark.slow


def test_upstream_stays_http_beside_a_deployment(tmp_path: Path) -> None:
    port = free_port()
    engine = Server(["serve-model", "fake", "--name", "engine", "--fake-reply", "from the engine"],
                    port=port).wait_ready()
    cfg = {"router_replicas": 1, "decision_log": str(tmp_path / "d.sqlite"),
           "backends": {
               "transformer": {"name": "engine", "kind": "upstream", "model": "engine",
                               "base_url": f"http://127.0.0.1:{port}/v1"},
               "hybrid": {"name": "h-fake", "kind": "fake", "replicas": 2, "num_cpus": 0.1,
                          "fake_reply": "from a hybrid replica"}},
           "ray": {"router_num_cpus": 0.1}}
    router = RayRouter(cfg, tmp_path)
    try:
        router.wait_ready()
        pid = router.proc.pid
        assert len(replicas(pid, "hybrid")) == 2
        assert replicas(pid, "transformer") == [] and replicas(pid, "span") == []
        for model, reply in (("engine", "from the engine"), ("h-fake", "from a hybrid replica")):
            r = httpx.post(router.url + "/v1/chat/completions", timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == reply
            assert r.headers["x-archroute-backend"] == model
        ready = httpx.get(router.url + "/ready").json()
        assert set(ready["backends"]) == {"engine", "h-fake"}
        # an upstream beside a deployment cannot span: no span deployment, and the built-in
        # span profile is not served (as in one process)
        assert "archroute-span" not in {m["id"] for m in
                                        httpx.get(router.url + "/v1/models").json()["data"]}
    finally:
        left = router.stop()
        engine.stop()
    assert router.proc.returncode == 0
    assert left == {}
