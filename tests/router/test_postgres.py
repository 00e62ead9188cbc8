"""The decision log and feedback in PostgreSQL (``decision_log: postgresql://...``), on a
real throwaway cluster: the same schema, feedback and retention as SQLite, and two router
replicas sharing one database, so feedback for a response served by one is accepted by the
other. Skips, saying why, where no cluster can start (``tests/router/pg.py``)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml

from router.decision_log import DecisionLog, DecisionRow, read_log
from tests.router.pg import Cluster, why_not
from tests.router.servers import Server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(why_not() is not None, reason=str(why_not()))]

KEY = "k-pg"
AUTH = {"Authorization": f"Bearer {KEY}"}
COPY = [{"role": "user", "content": "Repeat this exactly: the cat sat on the mat."}]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start()
    except (RuntimeError, OSError, TimeoutError) as exc:
        c.stop()
        pytest.skip(f"PostgreSQL did not start: {exc}")
    yield c
    c.stop()


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
