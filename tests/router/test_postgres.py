"""The decision log and feedback in PostgreSQL (``decision_log: postgresql://...``), on a
real throwaway cluster: the same schema, feedback and retention as SQLite, two router
replicas sharing one database, so feedback for a response served by one is accepted by the
other, and the database stopped and started under load (issue #21, N4). Skips, saying why,
where no cluster can start (``tests/router/pg.py``)."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from router.decision_log import DecisionLog, DecisionRow, read_log
from tests.router.pg import Cluster, pg_bin, started_cluster, why_not
from tests.router.servers import Server, serve_config

pytestmark = [pytest.mark.slow, pytest.mark.skipif(why_not() is not None, reason=str(why_not()))]

KEY = "k-pg"
AUTH = {"Authorization": f"Bearer {KEY}"}
COPY = [{"role": "user", "content": "Repeat this exactly: the cat sat on the mat."}]


@pytest.fixture(scope="module")
def cluster():
    with started_cluster() as c:
        yield c


def test_the_store_on_postgres(cluster: Cluster) -> None:
    url = cluster.database()
    t = 1_790_000_000.123456  # unix seconds need 8-byte floats (REAL would be 4 in PostgreSQL)
    dlog = DecisionLog(url, log_prompts=True)
    dlog.write(DecisionRow("r1", "chat", "archroute", profile="p", policy="rules", score=0.7,
                           threshold=0.5, decision="hybrid", backend="h", propensity=0.1,
                           explored=True, features={"copy_cue": 1.0}, prompt="hi",
                           request={"kind": "chat", "messages": [{"role": "user",
                                                                  "content": "hi"}]},
                           time=t))
    assert dlog.find("r1")["decision"] == "hybrid"  # waits for the writer's commit
    assert dlog.add_feedback("r1", 0.5, "reward") == ("new", 0.5)
    assert dlog.add_feedback("r1", 0.5, "reward") == ("duplicate", 0.5)
    assert dlog.add_feedback("r1", -1.0, "thumbs") == ("conflict", 0.5)
    assert dlog.add_reference("r1", "ref", "sha") == "new"
    assert dlog.add_reference("r1", "ref", "sha") == "duplicate"
    assert dlog.add_reference("r1", "other", "sha2") == "conflict"
    dlog.set_label("r1", "done", 1.5, 2.0, -0.5, 3, "t|h")
    assert dlog.find("nope", wait_s=0) is None
    dlog.close()
    # opening it again (another replica, a restart) is fine: the schema is created once
    DecisionLog(url).close()
    [row] = read_log(url)
    assert row["time"] == t and row["propensity"] == 0.1 and row["explored"] == 1
    assert row["features"] == {"copy_cue": 1.0} and row["request"]["messages"][0]["content"] == "hi"
    assert (row["reward"], row["feedback_kind"], row["gap"], row["label_status"]) == \
        (0.5, "reward", -0.5, "done")


def test_retention_on_postgres(cluster: Cluster) -> None:
    url = cluster.database()
    now = [2_000_000_000.0]
    dlog = DecisionLog(url, retention_days=30, retention_interval_s=0.02, clock=lambda: now[0])
    for rid, age in (("old", 31), ("new", 1)):
        dlog.write(DecisionRow(rid, "chat", "m", decision="hybrid", backend="h",
                               time=now[0] - age * 86400))
    dlog.flush()
    for rid in ("old", "new"):
        dlog.add_feedback(rid, 1.0, "reward")
    now[0] += 60
    deadline = time.monotonic() + 10
    while {r["request_id"] for r in read_log(url)} != {"new"}:
        assert time.monotonic() < deadline, "the old row was not pruned"
        time.sleep(0.05)
    assert [r["reward"] for r in read_log(url)] == [1.0]
    dlog.close()


def test_two_replicas_share_decisions_and_feedback(cluster: Cluster, tmp_path: Path) -> None:
    url = cluster.database()
    config = {"backends": {"transformer": {"name": "t-fake", "kind": "fake"},
                           "hybrid": {"name": "h-fake", "kind": "fake"}},
              "api_keys": [KEY], "decision_log": url, "log_prompts": True}
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(config))
    # started together: both create the schema at once (an advisory lock serialises them)
    a, b = (Server(["serve", "--config", str(tmp_path / "router.yaml")],
                   log_path=tmp_path / f"{n}.log") for n in "ab")
    try:
        a.wait_ready()
        b.wait_ready()
        served = httpx.post(a.url + "/v1/chat/completions", headers=AUTH,
                            json={"model": "archroute-rules", "messages": COPY}).json()
        rid = served["id"]
        r = httpx.post(b.url + "/v1/feedback", headers=AUTH, json={"id": rid, "thumbs": "up"})
        assert r.status_code == 200 and r.json()["duplicate"] is False, r.text
        r = httpx.post(a.url + "/v1/feedback", headers=AUTH, json={"id": rid, "reward": 1})
        assert r.status_code == 200 and r.json()["duplicate"] is True
        r = httpx.post(a.url + "/v1/feedback", headers=AUTH, json={"id": rid, "reward": -1})
        assert r.status_code == 409
        r = httpx.post(b.url + "/v1/feedback", headers=AUTH,
                       json={"id": rid, "reference": "the cat sat on the mat."})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20
        while True:
            out = httpx.get(a.url + f"/v1/feedback/{rid}", headers=AUTH).json()
            if (out["label"] or {}).get("status") == "done":
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.05)
        assert out["feedback"]["reward"] == 1.0 and out["label"]["pair"] == "t-fake|h-fake"
        r = httpx.post(b.url + "/v1/feedback", headers=AUTH, json={"id": "cmpl-x", "reward": 1})
        assert r.status_code == 404
    finally:
        a.stop()
        b.stop()
    rows = read_log(url)
    assert [r["request_id"] for r in rows] == [rid]
    assert rows[0]["reward"] == 1.0 and rows[0]["propensity"] == 1.0


# --- issue #21, N4: the database stopped and started under load ---------------------------

def _pg_ctl(cluster: Cluster, *args: str) -> None:
    cluster._run(pg_bin("pg_ctl") or "pg_ctl", "-D", str(cluster.data), "-w", "-t", "60", *args)


def _stop_db(cluster: Cluster) -> None:
    _pg_ctl(cluster, "-m", "fast", "stop")  # closes every connection, as a failover does


def _start_db(cluster: Cluster) -> None:
    _pg_ctl(cluster, "-l", str(cluster.base / "server.log"), "-o",
            f"-p {cluster.port} -k {cluster.base} -c listen_addresses=127.0.0.1", "start")


def test_a_database_outage_is_a_503_for_feedback_and_costs_chat_nothing(
        cluster: Cluster, tmp_path: Path) -> None:
    """Chats and feedback share one keep-alive pool (a gateway's) while PostgreSQL is
    stopped for ~3 s and started again: every chat is answered 200; feedback is 200 or a
    503 in the envelope with Retry-After (never a 500, which closed connections on
    e2795d7); every chat served during the outage has its decision row once the database
    is back; nothing was dropped."""
    url = cluster.database()
    server = serve_config({"backends": {"transformer": {"name": "t-fake", "kind": "fake"},
                                        "hybrid": {"name": "h-fake", "kind": "fake"}},
                           "api_keys": [KEY], "decision_log": url}, tmp_path)
    served: list[str] = []
    chats: list[int | str] = []
    feedback: list[tuple[float, int | str, str | None, str | None]] = []
    stop = threading.Event()
    rng = random.Random(0)

    def chat_loop(client: httpx.Client) -> None:
        while not stop.is_set():
            try:
                r = client.post("/v1/chat/completions", headers=AUTH,
                                json={"model": "archroute-rules", "messages": COPY})
            except httpx.HTTPError as exc:
                chats.append(type(exc).__name__)
                continue
            chats.append(r.status_code)
            if r.status_code == 200:
                served.append(r.json()["id"])

    def feedback_loop(client: httpx.Client) -> None:
        while not stop.is_set():
            time.sleep(0.1)  # below the rate limit (feedback_rate_per_s, 20)
            if not served:
                continue
            try:
                r = client.post("/v1/feedback", headers=AUTH,
                                json={"id": rng.choice(served), "thumbs": "up"})
            except httpx.HTTPError as exc:
                feedback.append((time.monotonic(), type(exc).__name__, None, None))
                continue
            code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
            feedback.append((time.monotonic(), r.status_code, code, r.headers.get("retry-after")))

    try:
        with httpx.Client(base_url=server.url, timeout=30,
                          limits=httpx.Limits(max_connections=4)) as client:
            threads = [threading.Thread(target=chat_loop, args=(client,)) for _ in range(3)]
            threads.append(threading.Thread(target=feedback_loop, args=(client,)))
            for t in threads:
                t.start()
            time.sleep(1.0)
            before = len(served)
            down_at = time.monotonic()
            _stop_db(cluster)
            time.sleep(3.0)
            during = served[before:]
            _start_db(cluster)
            up_at = time.monotonic()
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join(30)
            # feedback for a response served while the database was down is accepted once
            # its buffered row is written
            deadline = time.monotonic() + 20
            while True:
                r = client.post("/v1/feedback", headers=AUTH,
                                json={"id": during[-1], "reward": 0.5})
                if r.status_code == 200:
                    break
                assert r.status_code == 503 and time.monotonic() < deadline, r.text
                time.sleep(0.2)
            scrape = client.get("/metrics").text
    finally:
        server.stop()
    assert set(chats) == {200}, {c: chats.count(c) for c in set(chats)}
    assert len(during) > 10  # chats were served while the database was down
    codes = {(s, c, ra) for _, s, c, ra in feedback}
    assert codes <= {(200, None, None), (503, "decision_log_unavailable", "1")}, codes
    assert any(s == 503 and down_at < t < up_at for t, s, _, _ in feedback)
    assert "archroute_decision_log_dropped_rows_total 0.0" in scrape
    logged = {r["request_id"] for r in read_log(url)}
    assert set(served) <= logged, f"{len(set(served) - logged)} of {len(served)} rows missing"


def test_a_row_postgresql_refuses_costs_only_itself(cluster: Cluster) -> None:
    """PostgreSQL refuses a NUL character in text (a JSON string may hold one): that row is
    dropped and counted, the rows written with it in one batch are not (on e2795d7 the
    whole batch went)."""
    url = cluster.database()
    dlog = DecisionLog(url, log_prompts=True)
    for rid, prompt in (("a", "fine"), ("b", "nul \x00 here"), ("c", "fine too")):
        dlog.write(DecisionRow(rid, "chat", "m", backend="h", prompt=prompt))
    dlog.close()
    assert [r["request_id"] for r in read_log(url)] == ["a", "c"]
    assert dlog.dropped == 1
