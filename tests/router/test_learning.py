"""The router side of the learning loop (#16), in-process on fake backends: logged
propensities and exploration, feedback (rewards, thumbs, references scored off the request
path), retention, and live reloads of the classifier artifact."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from classifiers import artifact
from classifiers.training.estimators import LightGBMRouter
from models.fake import FakeBackend
from router.decision_log import MIGRATIONS, DecisionLog, DecisionRow, read_log
from router.learning.feedback import FeedbackService
from router.pool import BackendSlot, SlotLimits
from router.settings import SettingsError
from tests.router.conftest import Fakes, assert_envelope, fake_settings

COPY = [{"role": "user", "content": "Repeat this exactly: the cat sat on the mat."}]
PROSE = [{"role": "user", "content": "Write a short poem about the sea at dusk."}]
SIDE = [{"role": "user", "content": "### Task:\nGenerate a concise title for the chat."}]
KEY = "k-learning"
AUTH = {"Authorization": f"Bearer {KEY}"}


def explore_profiles(eps: float) -> dict:
    return {"explore": {"policy": "rules", "epsilon": eps}, "plain": {"policy": "rules"}}


def chat(client: TestClient, messages=COPY, model: str = "explore", **kw):
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, **kw},
                       headers=kw.pop("headers", AUTH))


def rows(f: Fakes) -> list[dict]:
    f.app.state.service.decision_log.flush()
    return read_log(f.settings.decision_log)


# --- 1: propensities and exploration ----------------------------------------------------

def test_deterministic_decisions_log_propensity_one(tmp_path: Path) -> None:
    f = Fakes(tmp_path, profiles=explore_profiles(0.0), default_profile="plain")
    with TestClient(f.app) as client:
        bodies = [chat(client, COPY, "plain").json(), chat(client, PROSE, "plain").json(),
                  chat(client, COPY, "t-fake").json(), chat(client, SIDE, "plain").json()]
        for b in bodies:
            assert b["archroute"]["propensity"] == 1.0 and b["archroute"]["explored"] is False
        logged = {r["request_id"]: r for r in rows(f)}
    assert [logged[b["id"]]["propensity"] for b in bodies] == [1.0] * 4
    assert [logged[b["id"]]["explored"] for b in bodies] == [0] * 4
    assert [logged[b["id"]]["decision"] for b in bodies] == ["transformer", "hybrid",
                                                             "transformer", "hybrid"]


def test_exploration_sends_epsilon_to_the_other_backend_and_logs_it(tmp_path: Path) -> None:
    eps, n = 0.2, 400
    f = Fakes(tmp_path, profiles=explore_profiles(eps), default_profile="explore",
              exploration_seed=7)
    with TestClient(f.app) as client:
        out = [chat(client, COPY).json() for _ in range(n)]  # the rules pick the transformer
        side = chat(client, SIDE).json()["archroute"]
        direct = chat(client, COPY, "h-fake").json()["archroute"]
        routed = client.post("/v1/route", json={"model": "explore", "messages": COPY},
                             headers=AUTH).json()
        metrics = client.get("/metrics").text
        logged = {r["request_id"]: r for r in rows(f)}
    explored = [b for b in out if b["archroute"]["explored"]]
    share = len(explored) / n
    assert abs(share - eps) < 4 * math.sqrt(eps * (1 - eps) / n), share  # ~ +-0.08
    for b in out:
        a, row = b["archroute"], logged[b["id"]]
        want = ("hybrid", "h-fake", eps) if a["explored"] else ("transformer", "t-fake", 1 - eps)
        assert (a["decision"], a["backend"], a["propensity"]) == pytest.approx(want)
        assert (row["decision"], row["backend"], row["propensity"], row["explored"]) == \
            pytest.approx((*want, int(a["explored"])))
        assert a["score"] >= a["threshold"]  # the policy's own pick is still recoverable
    # side requests and named backends never explore; /v1/route reports without exploring
    assert (side["propensity"], side["explored"]) == (1.0, False)
    assert (direct["propensity"], direct["explored"]) == (1.0, False)
    assert (routed["decision"], routed["propensity"], routed["explored"]) == \
        ("transformer", pytest.approx(1 - eps), False)
    assert f'archroute_explored_total{{backend="hybrid",profile="explore"}} {len(explored)}.0' \
        in metrics


def test_exploration_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    def run(seed: int, sub: str) -> list[bool]:
        (tmp_path / sub).mkdir()
        f = Fakes(tmp_path / sub, profiles=explore_profiles(0.5), default_profile="explore",
                  exploration_seed=seed)
        with TestClient(f.app) as client:
            assert f.app.state.service.exploration_seed == seed
            return [chat(client).json()["archroute"]["explored"] for _ in range(40)]

    assert run(3, "a") == run(3, "b") != run(4, "c")


def test_a_fallback_keeps_the_decided_propensity(tmp_path: Path) -> None:
    f = Fakes(tmp_path, profiles=explore_profiles(0.1), default_profile="explore",
              exploration_seed=0)
    with TestClient(f.app) as client:
        for _ in range(30):
            f.transformer.fail(1)
            b = chat(client).json()
            a = b["archroute"]
            if not a["explored"]:
                break
        logged = {r["request_id"]: r for r in rows(f)}
    assert a["explored"] is False and a["decision"] == "transformer"
    assert (a["backend"], a["fallback_from"], a["propensity"]) == ("h-fake", "t-fake",
                                                                   pytest.approx(0.9))
    row = logged[b["id"]]
    assert (row["decision"], row["backend"], row["fallback_from"], row["propensity"],
            row["explored"]) == ("transformer", "h-fake", "t-fake", pytest.approx(0.9), 0)


def test_a_database_password_is_never_shown(tmp_path: Path) -> None:
    s = fake_settings(tmp_path, decision_log="postgresql://router:s3cr3t@db:5432/archroute")
    assert "s3cr3t" not in str(s.redacted())
    assert s.redacted()["decision_log"] == "postgresql://router:**********@db:5432/archroute"
    from router.settings import load_settings

    env = {"ARCHROUTE_DECISION_LOG": "postgresql://u:p#1: x@h/db"}  # kept as given
    assert load_settings(environ=env).decision_log == "postgresql://u:p#1: x@h/db"
    assert load_settings(environ={"ARCHROUTE_DECISION_LOG": "null"}).decision_log is None


@pytest.mark.parametrize("profile,match", [
    ({"policy": "rules", "epsilon": 0.6}, "epsilon"),
    ({"policy": "rules", "epsilon": -0.1}, "epsilon"),
    ({"policy": "span", "epsilon": 0.1}, "epsilon"),
])
def test_epsilon_is_checked(tmp_path: Path, profile: dict, match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        fake_settings(tmp_path, profiles={"p": profile}, default_profile="p")


def test_an_old_log_gains_the_propensity_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE decisions (id INTEGER PRIMARY KEY, time REAL NOT NULL, "
                "request_id TEXT NOT NULL, endpoint TEXT NOT NULL, model TEXT NOT NULL, "
                "profile TEXT, policy TEXT, score REAL, threshold REAL, decision TEXT, "
                "backend TEXT, fallback_from TEXT, features TEXT, latency_ms REAL, "
                "overhead_ms REAL, prompt_tokens INTEGER, completion_tokens INTEGER, "
                "stream INTEGER, status INTEGER, error TEXT, prompt TEXT)")
    con.execute("INSERT INTO decisions (time, request_id, endpoint, model, status, decision, "
                "backend) VALUES (1.0, 'old', 'chat', 'archroute', 200, 'hybrid', 'h')")
    con.commit()
    con.close()
    dlog = DecisionLog(path)
    dlog.write(DecisionRow("new", "chat", "archroute", decision="hybrid", backend="h",
                           propensity=0.25, explored=True))
    dlog.close()
    cols = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(decisions)")]
    assert cols[-len(MIGRATIONS):] == list(MIGRATIONS)
    got = {r["request_id"]: (r["propensity"], r["explored"]) for r in read_log(path)}
    assert got == {"old": (None, None), "new": (0.25, 1)}


# --- 2: feedback -------------------------------------------------------------------------

@pytest.fixture()
def learning(tmp_path: Path):
    f = Fakes(tmp_path, api_keys=[KEY], log_prompts=True)
    with TestClient(f.app) as client:
        yield f, client


def feedback(client: TestClient, headers=AUTH, **body):
    return client.post("/v1/feedback", json=body, headers=headers)


def test_feedback_reward_and_thumbs_are_committed_before_the_answer(learning) -> None:
    f, client = learning
    a, b, c = (chat(client, m, "archroute-rules").json()["id"] for m in (COPY, PROSE, COPY))
    r = feedback(client, id=a, reward=0.25)  # at once: the decision row is not committed yet
    assert r.status_code == 200 and r.json() == {"object": "archroute.feedback", "id": a,
                                                 "reward": 0.25, "duplicate": False}
    assert feedback(client, id=b, thumbs="down").json()["reward"] == -1.0
    assert feedback(client, id=c, thumbs="up").json()["reward"] == 1.0
    # in the file now, read by another connection: no flush, no batching writer involved
    got = dict(sqlite3.connect(f.settings.decision_log).execute(
        "SELECT request_id, reward FROM feedback").fetchall())
    assert got == {a: 0.25, b: -1.0, c: 1.0}
    kinds = {r["request_id"]: r["feedback_kind"] for r in rows(f)}
    assert (kinds[a], kinds[b]) == ("reward", "thumbs")
    out = client.get(f"/v1/feedback/{b}", headers=AUTH).json()
    assert out["feedback"]["reward"] == -1.0 and out["label"] is None


def test_feedback_is_idempotent_and_final(learning) -> None:
    _, client = learning
    rid = chat(client, COPY, "archroute-rules").json()["id"]
    assert feedback(client, id=rid, thumbs="up").json()["duplicate"] is False
    again = feedback(client, id=rid, thumbs="up")
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert feedback(client, id=rid, reward=1.0).json()["duplicate"] is True  # same reward
    err = assert_envelope(feedback(client, id=rid, reward=-0.5), 409, "conflict")
    assert "already has reward 1" in err["message"]


@pytest.mark.parametrize("body,status,needle", [
    ({"reward": 1.5}, 400, "[-1, 1]"),
    ({"reward": -1.01}, 400, "[-1, 1]"),
    ({"reward": 0.5, "thumbs": "up"}, 400, "exactly one"),
    ({}, 400, "exactly one"),
    ({"thumbs": "sideways"}, 400, "thumbs"),
    ({"reward": "good"}, 400, "reward"),
    ({"reward": 1, "extra": 1}, 400, "extra"),
])
def test_bad_feedback_is_a_400(learning, body, status, needle) -> None:
    _, client = learning
    rid = chat(client, COPY, "archroute-rules").json()["id"]
    err = assert_envelope(feedback(client, id=rid, **body), status)
    assert needle in err["message"]


def test_feedback_for_an_unknown_response_is_a_404(learning) -> None:
    _, client = learning
    err = assert_envelope(feedback(client, id="chatcmpl-nope", reward=1), 404,
                          "response_not_found")
    assert "chatcmpl-nope" in err["message"]
    assert_envelope(client.get("/v1/feedback/chatcmpl-nope", headers=AUTH), 404)
    # a request that failed has no response to give feedback on
    f, _ = learning
    f.transformer.fail(10)
    f.hybrid.fail(10)
    r = chat(client, COPY, "archroute-rules")
    assert r.status_code == 502
    last = rows(f)[-1]
    assert last["status"] == 502
    assert_envelope(feedback(client, id=last["request_id"], reward=1), 404)


def test_feedback_needs_the_key(learning) -> None:
    _, client = learning
    rid = chat(client, COPY, "archroute-rules").json()["id"]
    assert_envelope(feedback(client, headers={}, id=rid, reward=1), 401, "invalid_api_key")


def test_feedback_without_a_decision_log(tmp_path: Path) -> None:
    f = Fakes(tmp_path, decision_log="")  # (None would be dropped as "not overridden")
    with TestClient(f.app) as client:
        rid = chat(client, COPY, "archroute-rules", headers={}).json()["id"]
        err = assert_envelope(feedback(client, headers={}, id=rid, reward=1), 400,
                              "feedback_unavailable")
    assert "decision_log" in err["message"]


def test_a_reference_needs_prompts(tmp_path: Path) -> None:
    f = Fakes(tmp_path)  # log_prompts off
    with TestClient(f.app) as client:
        rid = chat(client, COPY, "archroute-rules", headers={}).json()["id"]
        err = assert_envelope(feedback(client, headers={}, id=rid, reference="the cat"), 400,
                              "prompts_not_logged")
    assert "log_prompts" in err["message"]


def wait_label(client: TestClient, rid: str, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        label = client.get(f"/v1/feedback/{rid}", headers=AUTH).json()["label"]
        if label and label["status"] != "queued":
            return label
        time.sleep(0.02)
    raise TimeoutError(rid)


def test_a_reference_is_scored_under_both_backends(learning) -> None:
    f, client = learning
    chat_id = chat(client, COPY, "archroute-rules").json()["id"]
    cmpl = client.post("/v1/completions", json={"model": "archroute-rules",
                                                "prompt": "Once upon a time"}, headers=AUTH)
    cmpl_id = cmpl.json()["id"]
    for rid in (chat_id, cmpl_id):
        r = feedback(client, id=rid, reference="the cat sat on the mat.")
        assert r.status_code == 200 and r.json()["reference"] == "queued"
    labels = {rid: wait_label(client, rid) for rid in (chat_id, cmpl_id)}
    for label in labels.values():  # the fake scores by token length: the same on both
        assert label["status"] == "done" and label["n_tokens"] == 6
        assert label["gap"] == pytest.approx(label["loss_transformer"] - label["loss_hybrid"])
        assert label["pair"] == "t-fake|h-fake"
    # each backend scored the reference after the prompt it would have been given
    scored = [p for _, p in f.transformer.calls if _ == "score"]
    assert any("Repeat this exactly" in p and p.endswith("the cat sat on the mat.")
               for p in scored)
    assert any(p == "Once upon a timethe cat sat on the mat." for p in scored)
    again = feedback(client, id=chat_id, reference="the cat sat on the mat.")
    assert again.json()["duplicate"] is True
    assert_envelope(feedback(client, id=chat_id, reference="another answer"), 409, "conflict")
    logged = {r["request_id"]: r for r in rows(f)}
    assert logged[chat_id]["label_status"] == "done"
    assert logged[chat_id]["request"]["messages"] == COPY  # what retraining rebuilds from


def test_a_full_scoring_queue_is_a_429_and_serving_goes_on(tmp_path: Path) -> None:
    f = Fakes(tmp_path, api_keys=[KEY], log_prompts=True, feedback_queue_size=1)
    gate = threading.Event()
    with TestClient(f.app) as client:
        svc: FeedbackService = f.app.state.feedback

        async def stuck(rid: str, reference: str) -> dict:
            while not gate.is_set():
                await asyncio.sleep(0.01)
            return {"loss_transformer": 1.0, "loss_hybrid": 2.0, "gap": -1.0, "n_tokens": 1}

        svc._score = stuck  # type: ignore[method-assign]
        ids = [chat(client, COPY, "archroute-rules").json()["id"] for _ in range(3)]
        assert feedback(client, id=ids[0], reference="a").status_code == 200  # being scored
        deadline = time.monotonic() + 5
        while svc.queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert feedback(client, id=ids[1], reference="b").status_code == 200  # waiting
        err = assert_envelope(feedback(client, id=ids[2], reference="c"), 429,
                              "feedback_queue_full")
        assert "feedback_queue_size" in err["message"]
        t0 = time.perf_counter()
        assert chat(client, PROSE, "archroute-rules").status_code == 200  # not held up
        assert time.perf_counter() - t0 < 1.0
        # the refused one left nothing behind: it can be sent again once there is room
        gate.set()
        wait_label(client, ids[1])
        assert feedback(client, id=ids[2], reference="c").json()["duplicate"] is False
        assert wait_label(client, ids[2])["gap"] == -1.0


def test_scoring_waits_for_spare_capacity() -> None:
    """A reference is scored only when no request waits and a slot is free
    (``BackendSlot.score(spare_only=True)``, what labels from references use)."""

    async def main() -> list[str]:
        backend = FakeBackend("t", "transformer")
        slot = BackendSlot("transformer", backend, SlotLimits(max_concurrency=1))
        await slot.acquire()  # a request is being served
        task = asyncio.create_task(slot.score("p", " a b", spare_only=True))
        await asyncio.sleep(0.15)
        seen = [m for m, _ in backend.calls]
        slot.release()
        res = await asyncio.wait_for(task, 5)
        assert res.tokens == [" a", " b"] and slot.in_flight == 0
        return seen

    assert asyncio.run(main()) == []  # nothing scored while the slot was busy


def test_label_request_of_a_logged_row_is_the_label_type() -> None:
    """The router labels live traffic with ``archroute label``'s own request type: a chat row
    as a conversation, a completion row as a plain prompt, each keyed like the CLI keys it."""
    from classifiers.training.labels import LabelRequest, request_key
    from classifiers.training.realdata import RealRequest
    from models.base import ChatMessage
    from router.learning.references import label_request

    chat_row = {"request": {"kind": "chat", "messages": [{"role": "user", "content": "hi"}]}}
    got = label_request("r1", chat_row, "hello")
    assert got == LabelRequest.chat("r1", [ChatMessage("user", "hi")], "hello") and got.is_chat
    real = RealRequest("r1", "g", "s", "k", (ChatMessage("user", "hi"),), "hello")
    assert request_key(got, "pair") == request_key(LabelRequest.of(real), "pair")
    comp = label_request("r2", {"request": {"kind": "completion", "messages": [
        {"role": "user", "content": "Once"}]}}, " upon")
    assert comp.prompt == "Once" and not comp.is_chat
    assert comp.text_for(FakeBackend("t")) == ("Once", " upon")
    old = label_request("r3", {"request": None, "prompt": "text only"}, "x")
    assert old == LabelRequest.completion("r3", "text only", "x")


def test_acknowledged_references_are_scored_after_a_restart(tmp_path: Path) -> None:
    f = Fakes(tmp_path, api_keys=[KEY], log_prompts=True)
    with TestClient(f.app) as client:
        svc: FeedbackService = f.app.state.feedback
        rid = chat(client, COPY, "archroute-rules").json()["id"]
        svc._worker.cancel()  # type: ignore[union-attr] - as if the process died here
        assert feedback(client, id=rid, reference="the cat").status_code == 200
    f2 = Fakes(tmp_path, api_keys=[KEY], log_prompts=True)
    with TestClient(f2.app) as client:
        assert wait_label(client, rid)["status"] == "done"


# --- 3: retention --------------------------------------------------------------------------

def test_retention_deletes_old_decisions_and_their_feedback(tmp_path: Path) -> None:
    now = [1_000_000_000.0]
    day = 86400.0
    path = tmp_path / "d.sqlite"
    dlog = DecisionLog(path, retention_days=30, retention_interval_s=0.02,
                       clock=lambda: now[0])
    for rid, age in (("old", 40), ("edge", 29.9), ("new", 1)):
        dlog.write(DecisionRow(rid, "chat", "m", decision="hybrid", backend="h",
                               time=now[0] - age * day))
    dlog.flush()
    for rid in ("old", "new"):
        assert dlog.add_feedback(rid, 1.0, "reward") == ("new", 1.0)
        assert dlog.add_reference(rid, "ref", "sha") == "new"
    # the clock moves on a day: the next periodic prune (within the interval) drops "old"
    # and, a day later, "edge"; "new" stays
    now[0] += day
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = {r["request_id"] for r in read_log(path)}
        if left == {"new"}:
            break
        time.sleep(0.02)
    assert left == {"new"}
    con = sqlite3.connect(path)
    assert con.execute("SELECT request_id FROM feedback").fetchall() == [("new",)]
    assert con.execute("SELECT request_id FROM labels").fetchall() == [("new",)]
    dlog.close()


def test_retention_none_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite"
    dlog = DecisionLog(path, retention_days=None)
    dlog.write(DecisionRow("ancient", "chat", "m", time=1.0))
    dlog.close()
    assert [r["request_id"] for r in read_log(path)] == ["ancient"]


def test_the_router_prunes_at_start(tmp_path: Path) -> None:
    path = tmp_path / "decisions.sqlite"
    dlog = DecisionLog(path)
    dlog.write(DecisionRow("ancient", "chat", "m", time=time.time() - 10 * 86400))
    dlog.write(DecisionRow("recent", "chat", "m"))
    dlog.close()
    f = Fakes(tmp_path, decision_log_retention_days=5)
    with TestClient(f.app):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(read_log(path)) > 1:
            time.sleep(0.02)
    assert [r["request_id"] for r in read_log(path)] == ["recent"]


# --- 5: live reload -------------------------------------------------------------------------

def small_artifact(path: Path, flip: bool = False, thresholds=None) -> Path:
    """A tiny artifact on one feature: `chars_log` above the middle -> the transformer (or,
    ``flip``ped, the hybrid)."""
    rng = np.random.default_rng(1)
    X = rng.random((200, 1)) * 8
    y = (X[:, 0] > 4).astype(int)
    clf = LightGBMRouter(n_estimators=20, cv=0, min_child_samples=5).fit(X, 1 - y if flip else y)
    meta = {"margin": 0.05, "created_utc": f"2026-01-0{2 if flip else 1}T00:00:00Z",
            "thresholds": thresholds or {"quality": 0.5, "cost": 0.5}}
    return artifact.save(path, clf, meta=meta, feature_names=["chars_log"])


@pytest.fixture()
def reloadable(tmp_path: Path):
    a = small_artifact(tmp_path / "a")
    b = small_artifact(tmp_path / "b", flip=True, thresholds={"quality": 0.4, "cost": 0.6})
    f = Fakes(tmp_path, api_keys=[KEY], admin_api_keys=[KEY], artifact_roots=[str(tmp_path)],
              profiles={"auto": {"policy": "classifier"},
                        "cost": {"policy": "classifier", "policy_args": {"operating_point": "cost"}},
                        "pinned": {"policy": "classifier", "policy_args": {"artifact": str(a)}},
                        "rules": {"policy": "rules"}}, default_profile="auto")
    with TestClient(f.app) as client:
        yield f, client, a, b


def cards(client: TestClient) -> dict:
    return {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}


def reload(client: TestClient, path: Path | str | None = None, headers=AUTH):
    return client.post("/admin/reload", json={"artifact": str(path)} if path else None,
                       headers=headers)


LONG = [{"role": "user", "content": "word " * 400}]


def test_reload_swaps_the_artifact_for_new_requests(reloadable) -> None:
    f, client, a, b = reloadable
    r = reload(client, a)
    assert r.status_code == 200, r.text
    sha_a = artifact.digest(a)
    assert r.json()["artifact"]["sha256"] == sha_a
    assert cards(client)["auto"]["artifact"]["sha256"] == sha_a
    body = chat(client, LONG, "auto").json()["archroute"]
    assert (body["artifact"], body["decision"]) == (sha_a[:12], "transformer")
    r = reload(client, b)
    assert r.status_code == 200
    got = r.json()
    sha_b = artifact.digest(b)
    assert got["profiles"]["auto"] == {"threshold": 0.4, "artifact": sha_b}
    assert got["profiles"]["cost"]["threshold"] == 0.6
    assert got["profiles"]["pinned"]["artifact"] == sha_a  # names its own: reloaded from it
    c = cards(client)
    assert (c["auto"]["threshold"], c["cost"]["threshold"]) == (0.4, 0.6)
    assert c["auto"]["artifact"]["created_utc"] == "2026-01-02T00:00:00Z"
    assert c["archroute"]["artifact"]["sha256"] == sha_b
    body = chat(client, LONG, "auto").json()["archroute"]
    assert (body["artifact"], body["decision"]) == (sha_b[:12], "hybrid")  # flipped model
    assert chat(client, LONG, "pinned").json()["archroute"]["decision"] == "transformer"
    assert "artifact" not in chat(client, LONG, "rules").json()["archroute"]
    assert f.app.state.reloader.reloads == 2


def junk_artifact(p: Path) -> Path:
    (p / "junk").mkdir()
    (p / "junk" / "meta.json").write_text("{")
    (p / "junk" / "classifier.txt").write_text("x")
    return p / "junk"


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "missing", "no classifier artifact"),
    (junk_artifact, "not valid JSON"),
    (lambda p: small_artifact(p / "nothr", thresholds={"quality": 0.5}), "'cost'"),
])
def test_a_failing_artifact_is_refused_and_the_old_one_serves(reloadable, tmp_path: Path,
                                                              make, needle) -> None:
    f, client, a, _ = reloadable
    assert reload(client, a).status_code == 200
    before = cards(client)["auto"]["artifact"]
    err = assert_envelope(reload(client, make(tmp_path)), 400, "reload_failed")
    assert needle in err["message"] and "previous artifact keeps serving" in err["message"]
    assert cards(client)["auto"]["artifact"] == before
    assert chat(client, LONG, "auto").json()["archroute"]["artifact"] == before["sha256"][:12]


def test_a_self_check_that_moved_is_refused(reloadable, tmp_path: Path) -> None:
    _, client, a, _ = reloadable
    bad = small_artifact(tmp_path / "drift")
    import json

    meta = json.loads((bad / "meta.json").read_text())
    meta["self_check"][0]["p_transformer"] += 0.2
    (bad / "meta.json").write_text(json.dumps(meta))
    err = assert_envelope(reload(client, bad), 400, "reload_failed")
    assert "self-check failed" in err["message"]


def test_reload_is_behind_the_key(reloadable) -> None:
    _, client, a, _ = reloadable
    assert_envelope(reload(client, a, headers={}), 401, "invalid_api_key")
    assert_envelope(client.post("/admin/reload", content=b"{oops", headers=AUTH), 400)
    assert_envelope(client.post("/admin/reload", json={"artifact": str(a), "x": 1},
                                headers=AUTH), 400)
    assert "/admin/reload" not in client.get("/openapi.json").json()["paths"]


def test_without_keys_reload_is_for_loopback_clients_only(tmp_path: Path) -> None:
    f = Fakes(tmp_path)
    with TestClient(f.app) as client:  # its client address is "testclient", not loopback
        err = assert_envelope(client.post("/admin/reload"), 403, "forbidden")
    assert "loopback" in err["message"]
    with TestClient(f.app, client=("127.0.0.1", 50000)) as client:
        r = client.post("/admin/reload")  # the shipped default artifact
        assert r.status_code == 200, r.text
        assert r.json()["artifact"]["name"] == "default"  # no server path (#21 N10)


def test_a_rollback_event_names_the_artifact_it_restored(tmp_path: Path) -> None:
    """The rolled_back event says what serves again (the router records that row after the
    whole step, when a promotion later in the same step may have changed the live policy)."""
    from router.learning import gate as Gt
    from router.learning.loop import Labelled, LearningLoop, Served

    class Clf:
        def __init__(self, path: Path) -> None:
            self.path = path

    old, new = Served("old-artifact", Clf(tmp_path / "old"), None, 0.5), \
        Served("new-artifact", Clf(tmp_path / "new"), None, 0.5)
    loop = LearningLoop(base=object(), workdir=tmp_path, live=new, previous=old)
    ids = [f"r{i}" for i in range(400)]
    loop.rows = [Labelled(i, None, 1, 1.0, 1.0, 1.0) for i in ids]  # type: ignore[arg-type]
    assert sum(r.held for r in loop.rows) >= Gt.MIN_HELD_BACK
    worse = Gt.GateResult(False, "worse", 40, 40, -1.0, -1.2, -0.2, (-0.3, -0.1))
    loop._compare = lambda serving, candidate, rows: worse  # type: ignore[method-assign]
    ev = loop.check_rollback()
    assert ev is not None and ev["event"] == "rolled_back" and ev["from_"] == "new-artifact"
    assert (ev["to"], ev["to_path"]) == ("old-artifact", str(tmp_path / "old"))
    assert loop.live is old and loop.previous is None
