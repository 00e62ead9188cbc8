"""Connection limits against a real uvicorn process (#12 defect 5): a request that never
finishes arriving cannot hold a connection past the documented read deadlines, with or
without an API key, and the router keeps serving meanwhile."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
import yaml

from tests.router.servers import Server

HEADER_S, BODY_S = 0.6, 0.6


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conn")
    config = {"backends": {"transformer": {"name": "t-fake", "kind": "fake"},
                           "hybrid": {"name": "h-fake", "kind": "fake"}},
              "api_keys": ["k"], "header_timeout_s": HEADER_S, "body_timeout_s": BODY_S}
    (tmp / "router.yaml").write_text(yaml.safe_dump(config))
    server = Server(["serve", "--config", str(tmp / "router.yaml")], log_path=tmp / "log")
    server.wait_ready()
    yield server
    server.stop()


def _send(server: Server, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.sendall(data)
    return s


def _closed_within(s: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes ``s`` (reading what it sent), or fail after ``limit``."""
    t, got = time.perf_counter(), b""
    s.settimeout(limit)
    try:
        while chunk := s.recv(4096):
            got += chunk
    except TimeoutError:
        pytest.fail(f"connection still open after {limit} s")
    finally:
        s.close()
    return time.perf_counter() - t, got


def test_partial_headers_are_cut_off_without_a_key(router) -> None:
    s = _send(router, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-ty")
    took, got = _closed_within(s, HEADER_S + 3)
    assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got
    assert took < HEADER_S + 1.5


def test_a_body_that_never_finishes_is_cut_off(router) -> None:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\n"
            b"content-type: application/json\r\ncontent-length: 500\r\n\r\n{\"model\": ")
    s = _send(router, head)
    took, got = _closed_within(s, BODY_S + 3)
    assert took < BODY_S + 1.5
    assert got == b"" or got.startswith(b"HTTP/1.1 408")


def test_many_stalled_connections_do_not_block_service(router) -> None:
    stalled = [_send(router, b"GET /health HTTP/1.1\r\nho") for _ in range(50)]
    try:
        r = httpx.post(router.url + "/v1/chat/completions", headers={"authorization": "Bearer k"},
                       json={"model": "archroute-rules", "messages": [{"role": "user", "content": "hi"}]},
                       timeout=10)
        assert r.status_code == 200
        time.sleep(HEADER_S + 0.8)
        for s in stalled:  # every one was closed by the server
            s.settimeout(2)
            assert s.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        for s in stalled:
            s.close()


def test_a_slow_but_steady_request_within_the_limits_is_served(router) -> None:
    body = b'{"model": "archroute-rules", "messages": [{"role": "user", "content": "hi"}]}'
    s = _send(router, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    time.sleep(HEADER_S / 3)
    s.sendall(b"authorization: Bearer k\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n" % len(body))
    time.sleep(BODY_S / 3)
    s.sendall(body)
    s.settimeout(5)
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    s.close()
