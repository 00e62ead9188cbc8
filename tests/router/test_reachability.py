"""A router in front of an upstream that is not there says so (issue #27 item 10): a
warning at start-up naming the backend, and ``/ready`` reports it unreachable, with why,
until it answers. A real router process; the upstream is a free port nobody listens on,
then a real serve-model started on it."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.router.servers import Server, free_port, serve_config


@pytest.mark.slow
def test_unreachable_upstream_is_a_warning_and_shows_in_ready(tmp_path):
    port = free_port()
    config = {"backends": {
        "transformer": {"name": "up", "kind": "upstream", "base_url": f"http://127.0.0.1:{port}/v1",
                        "model": "fake"},
        "hybrid": {"name": "h-fake", "kind": "fake"}}, "decision_log": None}
    router = serve_config(config, tmp_path)
    upstream = None
    try:
        r = httpx.get(router.url + "/ready", timeout=30).json()
        assert r["ready"] is True  # the fake hybrid serves
        assert "unreachable" in r["backends"]["up"]["unreachable"]
        assert "unreachable" not in r["backends"]["h-fake"]
        log = (tmp_path / "router.log").read_text()
        assert "backend up:" in log and "unreachable" in log and "WARNING" in log
        # the upstream comes up: /ready says so without a restart
        upstream = Server(["serve-model", "fake", "--name", "fake"], port=port).wait_ready()
        deadline = time.monotonic() + 30
        while "unreachable" in httpx.get(router.url + "/ready").json()["backends"]["up"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        router.stop()
        if upstream is not None:
            upstream.stop()
