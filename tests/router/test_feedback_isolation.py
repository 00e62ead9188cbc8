"""Feedback cannot hurt serving (issue #21): lookups of unknown response ids hold none of
the threads requests are served on, a client that sends too much feedback gets 429 with
``Retry-After``, a database that fails is a 503 for feedback only; and the strict request
types that came with it (a ``reward`` is a JSON number, a ``reference`` has a cap,
``/v1/route`` checks a body as chat does, unknown field names are cut in the log)."""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from router.decision_log import DecisionLog
from router.learning.feedback import FeedbackRequest, FeedbackService
from tests.router.conftest import Fakes, assert_envelope
from tests.router.servers import serve_config

COPY = [{"role": "user", "content": "Repeat this exactly: the cat sat on the mat."}]
KEY, OTHER = "k-one", "k-two"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- N3: unknown ids starve nothing ------------------------------------------------------

def test_unknown_ids_hold_no_thread_of_the_default_executor(tmp_path: Path) -> None:
    """The default executor is where in-process backends generate and long prompts are
    scored. 32 lookups of unknown ids (each waits ~0.2 s for another replica's writer) are
    in flight, and a call on that executor still runs at once: on e2795d7 each lookup held
    one of its threads for its whole wait, and the call queued behind all of them (~3 s
    with 2 threads)."""

    async def main() -> tuple[float, list]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
        dlog = DecisionLog(tmp_path / "d.sqlite")

        class Svc:
            decision_log = dlog
            slots: dict = {}

        svc = FeedbackService(Svc())  # type: ignore[arg-type]
        posts = [asyncio.create_task(svc.submit(FeedbackRequest(id=f"chatcmpl-no{i}",
                                                                reward=1.0)))
                 for i in range(32)]
        await asyncio.sleep(0.05)  # every lookup has started and is waiting
        t = time.perf_counter()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 30)
        took = time.perf_counter() - t
        results = await asyncio.gather(*posts, return_exceptions=True)
        await svc.stop()
        dlog.close()
        return took, results

    took, results = asyncio.run(main())
    assert [getattr(r, "code", r) for r in results] == ["response_not_found"] * 32
    assert took < 0.5, f"a call on the default executor waited {took:.2f} s behind feedback"


def _p50_chat_ms(client: httpx.Client, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.post("/v1/chat/completions", headers=auth(KEY),
                        json={"model": "archroute-rules", "messages": COPY})
        times.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, r.text
    return statistics.median(times)


@pytest.mark.slow
def test_feedback_for_unknown_ids_does_not_slow_chat(tmp_path: Path) -> None:
    """A real router process on fake backends (which generate on the default executor):
    chat latency alone, then while 32 clients, each with its own key (so the rate limit
    does not stop them), post feedback for made-up ids as fast as they are answered. On
    e2795d7 the chat p50 went from a few ms to about a second."""
    loops = 32
    keys = [f"k-fb-{i}" for i in range(loops)]
    server = serve_config({
        "backends": {"transformer": {"name": "t-fake", "kind": "fake"},
                     "hybrid": {"name": "h-fake", "kind": "fake"}},
        "api_keys": [KEY, *keys], "decision_log": str(tmp_path / "d.sqlite")}, tmp_path)
    stop = threading.Event()
    answered: list[int] = []

    async def hammer() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            async def loop(key: str) -> None:
                i = 0
                while not stop.is_set():
                    r = await c.post("/v1/feedback", headers=auth(key),
                                     json={"id": f"chatcmpl-made-up-{key}-{i}", "reward": 1})
                    answered.append(r.status_code)
                    i += 1
            await asyncio.gather(*(loop(k) for k in keys))

    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            _p50_chat_ms(client, 10)  # warm up
            alone = _p50_chat_ms(client, 40)
            load = threading.Thread(target=asyncio.run, args=(hammer(),))
            load.start()
            time.sleep(1.0)  # every loop is waiting on a lookup
            loaded = _p50_chat_ms(client, 40)
            stop.set()
            load.join(30)
    finally:
        server.stop()
    print(f"chat p50 alone {alone:.1f} ms, with {loops} unknown-id feedback loops "
          f"{loaded:.1f} ms; {len(answered)} feedback answers")
    assert answered and set(answered) == {404}
    assert loaded < 5 * alone + 100, (alone, loaded)


# --- the rate limit ----------------------------------------------------------------------

@pytest.fixture()
def limited(tmp_path: Path):
    f = Fakes(tmp_path, api_keys=[KEY, OTHER], feedback_rate_per_s=0.5, feedback_burst=2)
    with TestClient(f.app) as client:
        yield f, client


def test_too_much_feedback_from_one_key_is_a_429_with_retry_after(limited) -> None:
    _, client = limited
    rid = client.post("/v1/chat/completions", headers=auth(KEY),
                      json={"model": "archroute-rules", "messages": COPY}).json()["id"]
    assert client.post("/v1/feedback", headers=auth(KEY),
                       json={"id": rid, "thumbs": "up"}).status_code == 200
    assert client.post("/v1/feedback", headers=auth(KEY),
                       json={"id": "chatcmpl-no", "reward": 1}).status_code == 404
    r = client.post("/v1/feedback", headers=auth(KEY), json={"id": rid, "thumbs": "up"})
    err = assert_envelope(r, 429, "feedback_rate_limited")
    assert err["type"] == "rate_limit_error" and "feedback_rate_per_s" in err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 2  # one token at 0.5/s
    # another key has its own bucket; chat is not limited
    assert client.post("/v1/feedback", headers=auth(OTHER),
                       json={"id": rid, "thumbs": "up"}).json()["duplicate"] is True
    assert client.post("/v1/chat/completions", headers=auth(KEY),
                       json={"model": "archroute-rules", "messages": COPY}).status_code == 200
    assert client.get(f"/v1/feedback/{rid}", headers=auth(KEY)).status_code == 200


# --- N4: a database that fails is a 503 for feedback, never for chat ----------------------

@contextmanager
def failing_database(dlog: DecisionLog):
    """Every transaction fails as an unreachable database's does, until the block ends."""
    import sqlite3

    real = dlog.store.transaction

    @contextmanager
    def transaction(conn):
        raise sqlite3.OperationalError("unable to open database file")
        yield  # pragma: no cover

    dlog.store.transaction = transaction  # type: ignore[method-assign]
    try:
        yield
    finally:
        dlog.store.transaction = real  # type: ignore[method-assign]


def test_a_failing_database_is_a_503_for_feedback_and_chat_goes_on(tmp_path: Path) -> None:
    f = Fakes(tmp_path, api_keys=[KEY])
    with TestClient(f.app) as client:
        dlog = f.app.state.service.decision_log
        served = client.post("/v1/chat/completions", headers=auth(KEY),
                             json={"model": "archroute-rules", "messages": COPY}).json()["id"]
        dlog.flush()
        with failing_database(dlog):
            r = client.post("/v1/feedback", headers=auth(KEY), json={"id": served, "reward": 1})
            err = assert_envelope(r, 503, "decision_log_unavailable")
            assert r.headers["retry-after"] == "1" and "retry" in err["message"]
            assert_envelope(client.get(f"/v1/feedback/{served}", headers=auth(KEY)), 503)
            during = [client.post("/v1/chat/completions", headers=auth(KEY),
                                  json={"model": "archroute-rules", "messages": COPY})
                      for _ in range(5)]
            assert [r.status_code for r in during] == [200] * 5
            dlog.flush()
            assert dlog.buffered == 5
            scrape = client.get("/metrics").text
            assert "archroute_decision_log_buffered_rows 5.0" in scrape
        # back: the buffered rows are written, and feedback for them is accepted
        deadline = time.monotonic() + 15
        while dlog.buffered:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for r in during:
            rid = r.json()["id"]
            assert client.post("/v1/feedback", headers=auth(KEY),
                               json={"id": rid, "reward": 0.5}).status_code == 200
        assert "archroute_decision_log_dropped_rows_total 0.0" in client.get("/metrics").text


# --- N11: strict request types -----------------------------------------------------------

@pytest.fixture()
def fb(tmp_path: Path):
    f = Fakes(tmp_path, log_prompts=True)  # the default settings
    with TestClient(f.app) as client:
        rid = client.post("/v1/chat/completions",
                          json={"model": "archroute-rules", "messages": COPY}).json()["id"]
        yield client, rid


@pytest.mark.parametrize("reward", ["0.5", True, False, "1", [1], {"v": 1}])
def test_a_reward_is_a_json_number(fb, reward) -> None:
    client, rid = fb
    err = assert_envelope(client.post("/v1/feedback", json={"id": rid, "reward": reward}), 400)
    assert err["param"] == "reward"


def test_an_integer_reward_is_a_number(fb) -> None:
    client, rid = fb
    assert client.post("/v1/feedback", json={"id": rid, "reward": 1}).json()["reward"] == 1.0


def test_a_reference_longer_than_the_setting_is_a_400(fb) -> None:
    """``feedback_max_reference_chars`` (default 32,768): on e2795d7 a reference was stored
    whole up to the body limit (1 MB)."""
    client, rid = fb
    cap = 32_768
    err = assert_envelope(client.post("/v1/feedback",
                                      json={"id": rid, "reference": "x" * (cap + 1)}),
                          400, "reference_too_long")
    assert err["param"] == "reference" and "feedback_max_reference_chars" in err["message"]
    r = client.post("/v1/feedback", json={"id": rid, "reference": "x" * cap})
    assert r.status_code == 200 and r.json()["reference"] == "queued"


@pytest.mark.parametrize("extra,param", [
    ({"functions": [{"name": "f"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     "functions"),
    ({"function_call": "auto", "tool_choice": "auto"}, "function_call"),
])
def test_route_checks_a_body_as_chat_does(fb, extra, param) -> None:
    client, _ = fb
    body = {"model": "archroute-rules", "messages": COPY, **extra}
    for path in ("/v1/chat/completions", "/v1/route"):
        err = assert_envelope(client.post(path, json=body), 400)
        assert err["param"] == param and "not both" in err["message"], path


# --- D6: client-chosen names are cut in the log -------------------------------------------

def test_unknown_field_names_are_cut_in_the_log(fb, caplog) -> None:
    client, _ = fb
    long_name = "n" * 100_000
    body = {"model": "archroute-rules", "messages": COPY, long_name: 1,
            **{f"x{i}": 1 for i in range(40)}}
    with caplog.at_level(logging.INFO, logger="router.protocol"):
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    [line] = [r.getMessage() for r in caplog.records if "unknown fields" in r.getMessage()]
    assert len(line) < 2_000 and "(100000 chars)" in line and "and 25 more" in line
