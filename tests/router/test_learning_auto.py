"""The loop runs itself (#24 item 3): a profile's ``learning:`` setting, validated at start;
real router processes (uvicorn) that retrain by themselves every N labels from references
posted through the API, answer during the retrain, promote a better candidate (gate, reload)
or leave the artifact unchanged when the gate refuses, with every step in the decision log,
``/metrics`` and ``archroute learning history``; a manual reload during a retrain is a 409;
one trainer at a time (a file lock beside a SQLite log, an advisory lock in PostgreSQL)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from classifiers import artifact
from router.learning.trainlock import TrainerLock
from router.settings import SettingsError, load_settings
from tests.router import pg
from tests.router.conftest import Fakes, assert_envelope
from tests.router.servers import ROOT, reference_available
from tests.router.test_learning_e2e import AUTH, KEY, archroute, models, requests_, start

LEARN = {"policy": "classifier", "epsilon": 0.2}


def learning_profiles(**learning) -> dict:
    return {"archroute-auto": {**LEARN, "learning": {"poll_s": 0.2, **learning}},
            "archroute-rules": {"policy": "rules"}}


# --- the setting ------------------------------------------------------------------------

@pytest.mark.parametrize(("profile", "top", "says"), [
    ({"policy": "classifier", "learning": {"retrain_every": 0}}, {},
     "retrain_every: Input should be greater than or equal to 1"),
    ({"policy": "classifier", "epsilon": 0.6, "learning": {}}, {},
     "epsilon: Input should be less than or equal to 0.5"),
    ({"policy": "rules", "learning": {}}, {}, "only classifier and guarded profiles learn"),
    ({"policy": "classifier", "learning": {}}, {"log_prompts": False}, "needs log_prompts"),
    ({"policy": "classifier", "learning": {}}, {"decision_log": ""}, "needs a decision_log"),
    ({"policy": "classifier", "learning": {"workdir": "/elsewhere"}}, {},
     "is not inside artifact_roots"),
    ({"policy": "classifier", "policy_args": {"artifact": "runs/x"}, "learning": {}}, {},
     "names its own artifact"),
    ({"policy": "classifier", "learning": {"retrain_evry": 5}}, {}, "retrain_evry"),
])
def test_bad_learning_settings_are_start_up_errors(profile, top, says) -> None:
    with pytest.raises(SettingsError, match=says.replace("(", r"\(").replace(")", r"\)")):
        load_settings(overrides={"log_prompts": True, "profiles": {"a": profile}, **top},
                      environ={})


def test_learning_turns_exploration_on_unless_the_profile_sets_epsilon() -> None:
    def eps(profile: dict) -> float:
        s = load_settings(overrides={"log_prompts": True, "profiles": {"a": profile}},
                          environ={})
        return s.profiles["a"].epsilon

    assert eps({"policy": "classifier", "learning": {}}) == 0.1
    assert eps({"policy": "classifier", "epsilon": 0, "learning": {}}) == 0.0
    assert eps({"policy": "classifier", "learning": {"enabled": False}}) == 0.0
    with pytest.raises(SettingsError, match="at most one profile learns"):
        load_settings(overrides={"log_prompts": True, "profiles": {
            "a": {"policy": "classifier", "learning": {}},
            "b": {"policy": "guarded", "learning": {}}}}, environ={})


def test_serve_refuses_a_schedule_of_zero_at_start(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(json.dumps({"log_prompts": True, "profiles": {
        "auto": {"policy": "classifier", "learning": {"retrain_every": 0}}}}))
    res = archroute("serve", "--config", str(tmp_path / "r.yaml"))
    assert res.returncode == 2
    assert "profiles.auto.learning.retrain_every" in res.stderr and "Traceback" not in res.stderr


# --- a reload racing a retrain ------------------------------------------------------------

def test_a_reload_during_a_retrain_is_a_409_and_changes_nothing(tmp_path: Path) -> None:
    f = Fakes(tmp_path, api_keys=[KEY], admin_api_keys=[KEY], log_prompts=True,
              artifact_roots=[str(tmp_path)],
              profiles={"auto": {"policy": "classifier",
                                 "learning": {"workdir": str(tmp_path / "learning")}}})
    with TestClient(f.app) as client:
        learner = f.app.state.learner
        assert learner is not None and learner.profile == "auto"
        before = models_of(client)["auto"]["artifact"]["sha256"]
        learner.retraining_since = time.monotonic()  # as while its worker thread fits
        err = assert_envelope(client.post("/admin/reload", headers=AUTH, json={}), 409,
                              "retrain_running")
        assert "retraining" in err["message"] and "keeps serving" in err["message"]
        assert "archroute_learning_retraining{profile=\"auto\"} 1.0" in client.get("/metrics").text
        learner.retraining_since = None
        assert client.post("/admin/reload", headers=AUTH, json={}).status_code == 200
        assert models_of(client)["auto"]["artifact"]["sha256"] == before


def models_of(client: TestClient) -> dict:
    return {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}


# --- one trainer at a time ----------------------------------------------------------------

HOLD = ("import sys, time; from router.learning.trainlock import TrainerLock; "
        "l = TrainerLock(sys.argv[1]); print(l.acquire(), flush=True); time.sleep(60)")


def _holder(target: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, target], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, env={"PYTHONPATH": str(ROOT)})
    assert p.stdout is not None and p.stdout.readline().strip() == "True"
    return p


def _one_trainer(target: str) -> None:
    other = _holder(target)  # another replica's trainer holds it
    try:
        lock = TrainerLock(target)
        with lock.held() as mine:
            assert not mine
    finally:
        other.kill()  # a replica that dies releases it
        other.wait()
    deadline = time.monotonic() + 10
    while not (mine := lock.acquire()):
        assert time.monotonic() < deadline, "the dead trainer's lock was never released"
        time.sleep(0.1)
    assert mine and not TrainerLock(target).acquire()  # held here now
    lock.release()
    with TrainerLock(target).held() as again:
        assert again


def test_one_trainer_at_a_time_on_a_sqlite_log(tmp_path: Path) -> None:
    _one_trainer(str(tmp_path / "decisions.sqlite"))


@pytest.mark.slow
@pytest.mark.skipif(pg.why_not() is not None, reason=str(pg.why_not()))
def test_one_trainer_at_a_time_on_postgres() -> None:
    """The advisory lock, and the history table in PostgreSQL (written as the router writes
    it, read as the CLI reads it)."""
    from router.decision_log import DecisionLog, read_learning_events

    cluster = pg.Cluster().start()
    try:
        url = cluster.database()
        _one_trainer(url)
        dlog = DecisionLog(url, log_prompts=True)
        try:
            dlog.add_learning_event({"time": 1.0, "profile": "auto", "event": "refused",
                                     "labels": 40, "difference": 0.01, "ci_low": -0.02,
                                     "ci_high": 0.04, "held_back": 10, "reason": "why"})
            assert dlog.label_count() == 0
            assert [e["event"] for e in dlog.learning_events()] == ["refused"]
        finally:
            dlog.close()
        (row,) = read_learning_events(url)
        assert row["difference"] == 0.01 and row["held_back"] == 10
        res = archroute("learning", "history", "--log", url)
        assert res.returncode == 0 and "refused" in res.stdout and "+0.0100" in res.stdout
    finally:
        cluster.stop()


# --- the loop by itself, in a real router process ---------------------------------------------

def history(db: Path, *extra: str) -> subprocess.CompletedProcess:
    res = archroute("learning", "history", "--log", str(db), *extra)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def events(db: Path) -> list[dict]:
    """The history as the router wrote it (read directly: the CLI is checked once per test)."""
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM learning_events ORDER BY id")]
    except sqlite3.OperationalError:  # the router has not created the table yet
        return []
    finally:
        con.close()


def wait_for(db: Path, event: str, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        evs = events(db)
        if any(e["event"] == event for e in evs):
            return evs
        assert time.monotonic() < deadline, f"no {event!r} within {timeout_s} s: {evs}"
        time.sleep(0.2)


def label_all(url: str, reqs, model: str = "archroute-auto", clients: int = 4) -> None:
    """Each request served, then its reference posted, by ``clients`` clients at once."""
    def one(part) -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            for msgs, ref, _ in part:
                body = c.post("/v1/chat/completions", json={"model": model, "messages": msgs,
                                                            "max_tokens": 1}).json()
                r = c.post("/v1/feedback", json={"id": body["id"], "reference": ref})
                assert r.status_code == 200, r.text

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, [reqs[i::clients] for i in range(clients)]))


@pytest.mark.slow
def test_the_loop_retrains_gates_and_reloads_by_itself(tmp_path: Path) -> None:
    """Fakes whose pattern is the reverse of the study's pair (copying: the hybrid; new text:
    the transformer): 160 references through the API and a retrain every 160, by itself;
    the router answers during it; the candidate passes the gate and serves; every step in
    the history, /metrics and `archroute learning history`."""
    db = tmp_path / "decisions.sqlite"
    router = start(tmp_path, module="tests.router.reversed_server", log_prompts=True,
                   profiles=learning_profiles(retrain_every=160, min_labels=20,
                                              workdir=str(tmp_path / "learning")),
                   exploration_seed=3, feedback_rate_per_s=1000, feedback_burst=1000,
                   feedback_queue_size=256)
    try:
        base = models(router.url)["archroute-auto"]["artifact"]["sha256"]
        stop, during = threading.Event(), []

        def ask() -> None:  # a client while the retrain runs
            with httpx.Client(base_url=router.url, headers=AUTH, timeout=30) as c2:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    r = c2.post("/v1/chat/completions", json={
                        "model": "archroute-rules", "messages": requests_(1)[0][0]})
                    m = c2.get("/metrics").text
                    during.append((r.status_code, time.perf_counter() - t0,
                                   'archroute_learning_retraining{profile="archroute-auto"}'
                                   ' 1.0' in m))
                    time.sleep(0.05)

        label_all(router.url, requests_(80))
        client = threading.Thread(target=ask, daemon=True)
        client.start()
        evs = wait_for(db, "reloaded", 60)
        stop.set()
        client.join(30)
        kinds = [e["event"] for e in evs]
        assert kinds == ["retrain_started", "promoted", "reloaded"], evs
        promoted = evs[1]
        assert promoted["difference"] > 0 and promoted["ci_low"] > 0
        assert promoted["held_back"] >= 20 and promoted["labels"] == 160
        assert promoted["live"] == base[:12] and promoted["path"].startswith(str(tmp_path))
        new = models(router.url)["archroute-auto"]["artifact"]
        assert new["sha256"][:12] == promoted["candidate"] == evs[2]["candidate"]
        assert new["sha256"] == artifact.digest(promoted["path"])
        # the router answered while the candidate was fitted and judged
        busy = [(s, t) for s, t, retraining in during if retraining]
        assert busy, "no request was answered during the retrain"
        assert {s for s, _, _ in during} == {200}
        assert max(t for _, t in busy) < 5.0, busy
        # /metrics and the history CLI
        m = httpx.get(router.url + "/metrics").text
        for line in ('archroute_learning_events_total{event="promoted",profile="archroute-auto"}'
                     ' 1.0', 'archroute_learning_events_total{event="refused",'
                     'profile="archroute-auto"} 0.0',
                     'archroute_learning_retraining{profile="archroute-auto"} 0.0'):
            assert line in m, line
        table = history(db).stdout
        assert table.splitlines()[0].split()[:4] == ["id", "time", "profile", "event"]
        assert " promoted " in table and f"{promoted['difference']:+.4f}" in table
        # the gate judges a loop candidate reloaded by hand too: it was trained on the log
        meta = json.loads((Path(promoted["path"]) / "meta.json").read_text())
        assert meta["training_data"]["decision_log"] and meta["guard"]
    finally:
        router.stop()


@pytest.mark.slow
@pytest.mark.skipif(not reference_available(), reason="the embedded reference pair is missing")
def test_a_refused_candidate_leaves_the_embedded_pairs_artifact_unchanged(tmp_path: Path) -> None:
    """The embedded pair in-process, references scored by the real models: a retrain every
    40 labels, by itself; too little held-back evidence (about 10 of 40), so the gate refuses
    and the shipped artifact serves on."""
    import yaml

    db = tmp_path / "decisions.sqlite"
    cfg = {"decision_log": str(db), "log_prompts": True, "api_keys": [KEY],
           "admin_api_keys": [KEY], "artifact_roots": [str(tmp_path)], "torch_threads": 1,
           "default_profile": "archroute-auto",
           "profiles": learning_profiles(retrain_every=40, min_labels=20,
                                         workdir=str(tmp_path / "learning"))}
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(cfg))
    from tests.router.servers import Server

    router = Server(["serve", "--config", str(tmp_path / "router.yaml")],
                    env={"ARCHROUTE_TORCH_THREADS": "1"},
                    log_path=tmp_path / "router.log").wait_ready(120)
    try:
        shipped = artifact.digest(artifact.DEFAULT_DIR)
        assert models(router.url)["archroute-auto"]["artifact"]["sha256"] == shipped
        label_all(router.url, requests_(20))
        evs = wait_for(db, "refused", 60)
        assert [e["event"] for e in evs] == ["retrain_started", "refused"]
        assert evs[0]["labels"] == 40 and evs[1]["candidate"] and evs[1]["path"]
        assert "too few held-back" in evs[1]["reason"]
        assert models(router.url)["archroute-auto"]["artifact"]["sha256"] == shipped
        assert "refused" in history(db, "--profile", "archroute-auto").stdout
    finally:
        router.stop()


@pytest.mark.slow
def test_a_promoted_artifact_is_rolled_back_when_the_traffic_turns(tmp_path: Path) -> None:
    """The loop promotes a candidate on reversed traffic; the router restarts (it serves the
    promoted artifact again, from the log) and the traffic turns back to the study's pattern:
    at the next retrain the live artifact does worse than the one it replaced on the
    held-back requests since, and the loop restores that one by itself."""
    db = tmp_path / "decisions.sqlite"
    config = {"log_prompts": True, "exploration_seed": 5, "feedback_rate_per_s": 1000,
              "feedback_burst": 1000, "feedback_queue_size": 256,
              "profiles": learning_profiles(retrain_every=160, min_labels=20,
                                            workdir=str(tmp_path / "learning"))}
    shipped = artifact.digest(artifact.DEFAULT_DIR)
    router = start(tmp_path, module="tests.router.reversed_server", **config)
    try:
        label_all(router.url, requests_(80))
        evs = wait_for(db, "reloaded", 60)
    finally:
        router.stop()
    promoted = next(e for e in evs if e["event"] == "promoted")
    router = start(tmp_path, module="tests.router.learning_server", **config)
    try:
        # at start, the log's last promotion serves again
        assert models(router.url)["archroute-auto"]["artifact"]["sha256"][:12] == \
            promoted["candidate"]
        label_all(router.url, requests_(80, offset=1))
        evs = wait_for(db, "rolled_back", 90)
        back = next(e for e in evs if e["event"] == "rolled_back")
        # the artifact the live one replaced: the shipped one, or (when a retrain on the
        # turning traffic promoted again first, as a slow machine can make happen) the
        # promotion before the live one
        chain = [(shipped[:12], str(artifact.DEFAULT_DIR))]
        for e in evs:
            if e["id"] >= back["id"]:
                break
            if e["event"] == "promoted":
                chain.append((e["candidate"], e["path"]))
        assert (back["candidate"], back["path"]) == chain[-2] and back["ci_high"] < 0, (back, chain)
        deadline = time.monotonic() + 30
        while not any(e["event"] == "reloaded" and e["id"] > back["id"] for e in events(db)):
            assert time.monotonic() < deadline, events(db)
            time.sleep(0.2)
        reload_ = next(e for e in events(db) if e["event"] == "reloaded" and e["id"] > back["id"])
        assert reload_["candidate"] in (shipped[:12], *(e["candidate"] for e in events(db)
                                                        if e["event"] == "promoted"))
        assert "rolled_back" in history(db).stdout
    finally:
        router.stop()
