"""The learning loop against real router processes (uvicorn): reloads under a steady load of
concurrent clients drop no request, SIGHUP reloads the default, acknowledged feedback
survives a kill, and the issue's loop end to end: serve with exploration, feedback through
the API, evaluate off-policy from the log, retrain from it, reload under load, and the new
artifact serves."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from classifiers import artifact
from tests.router.servers import ROOT, Server
from tests.router.test_learning import small_artifact

pytestmark = pytest.mark.slow

KEY = "k-e2e"
AUTH = {"Authorization": f"Bearer {KEY}"}
COPY = [{"role": "user", "content": "Repeat this exactly: the cat sat on the mat."}]
LONG = [{"role": "user", "content": "word " * 400}]


def start(tmp: Path, module: str = "router.cli", **config) -> Server:
    base = {"backends": {"transformer": {"name": "t-fake", "kind": "fake", "fake_delay_s": 0.02},
                         "hybrid": {"name": "h-fake", "kind": "fake", "fake_delay_s": 0.02}},
            "api_keys": [KEY], "admin_api_keys": [KEY], "artifact_roots": [str(tmp)],
            "decision_log": str(tmp / "decisions.sqlite")}
    (tmp / "router.yaml").write_text(yaml.safe_dump({**base, **config}))
    args = ["--config", str(tmp / "router.yaml")]
    return Server(args if module != "router.cli" else ["serve", *args], module=module,
                  env={"ARCHROUTE_TORCH_THREADS": "1"},
                  log_path=tmp / "router.log").wait_ready()


class Load:
    """``n`` clients sending chat requests back to back (some streamed) until stopped; every
    status and the artifact each answer was scored with are kept."""

    def __init__(self, url: str, n: int = 8, model: str = "archroute") -> None:
        self.url, self.model = url, model
        self.stop = threading.Event()
        self.results: list[tuple[int, str | None, float]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(n)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=30) as c:
            k = 0
            while not self.stop.is_set():
                k += 1
                msgs = LONG if (i + k) % 2 else COPY
                try:
                    if k % 3 == 0:  # a stream: in flight across a reload for longest
                        with c.stream("POST", "/v1/chat/completions",
                                      json={"model": self.model, "messages": msgs,
                                            "stream": True}) as r:
                            text = "".join(r.iter_text())
                            first = json.loads(text.split("\n\n")[0][6:]) if r.status_code == 200 else {}
                            ok = r.status_code == 200 and text.endswith("data: [DONE]\n\n") \
                                and '"error"' not in text
                            art = first.get("archroute", {}).get("artifact")
                            status = r.status_code if ok else 599
                    else:
                        r = c.post("/v1/chat/completions",
                                   json={"model": self.model, "messages": msgs})
                        status = r.status_code
                        art = r.json().get("archroute", {}).get("artifact") if status == 200 else None
                except httpx.HTTPError as exc:
                    status, art = 0, None
                    self.errors.append(repr(exc))
                with self._lock:
                    self.results.append((status, art, time.monotonic()))


def models(url: str) -> dict:
    return {m["id"]: m for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]}


def test_reload_under_load_drops_no_request(tmp_path: Path) -> None:
    a = small_artifact(tmp_path / "a")
    b = small_artifact(tmp_path / "b", flip=True)
    sha_a, sha_b = artifact.digest(a)[:12], artifact.digest(b)[:12]
    router = start(tmp_path)
    try:
        with Load(router.url, n=8) as load:
            time.sleep(0.5)
            outcomes = []
            for i in range(6):
                r = httpx.post(router.url + "/admin/reload", headers=AUTH, timeout=30,
                               json={"artifact": str(a if i % 2 == 0 else b)})
                outcomes.append(r.status_code)
                time.sleep(0.3)
            bad = httpx.post(router.url + "/admin/reload", headers=AUTH, timeout=30,
                             json={"artifact": str(tmp_path / "nothing-here")})
            time.sleep(0.3)
            t_swapped = time.monotonic()
            time.sleep(0.5)
        assert outcomes == [200] * 6 and bad.status_code == 400
        statuses = [s for s, _, _ in load.results]
        assert load.errors == [] and len(statuses) > 100
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        arts = {x for _, x, _ in load.results}
        assert {sha_a, sha_b} <= arts  # both served while the other was being loaded
        after = {x for _, x, t in load.results if t > t_swapped + 0.1}
        assert after == {sha_b}  # the last good reload serves; the failed one changed nothing
        assert models(router.url)["archroute"]["artifact"]["sha256"][:12] == sha_b
        # SIGHUP reloads the shipped default
        os.kill(router.proc.pid, signal.SIGHUP)
        default = artifact.digest(artifact.DEFAULT_DIR)
        deadline = time.monotonic() + 30
        while models(router.url)["archroute"]["artifact"]["sha256"] != default:
            assert time.monotonic() < deadline, "SIGHUP did not reload the default artifact"
            time.sleep(0.1)
        assert router.proc.poll() is None
    finally:
        router.stop()


def test_acknowledged_feedback_survives_a_kill(tmp_path: Path) -> None:
    router = start(tmp_path)
    try:
        rid = httpx.post(router.url + "/v1/chat/completions", headers=AUTH,
                         json={"model": "archroute-rules", "messages": COPY}).json()["id"]
        r = httpx.post(router.url + "/v1/feedback", headers=AUTH,
                       json={"id": rid, "thumbs": "down"})
        assert r.status_code == 200
    finally:
        router.kill()  # SIGKILL right after the 200: no shutdown, no flush
    con = sqlite3.connect(tmp_path / "decisions.sqlite")
    assert con.execute("SELECT reward, kind FROM feedback WHERE request_id = ?",
                       (rid,)).fetchall() == [(-1.0, "thumbs")]


# --- the end-to-end test -------------------------------------------------------------

SENTENCES = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
             "all that glitters is not gold", "the early bird catches the worm",
             "rome was not built in a day", "actions speak louder than words",
             "practice makes perfect every single time", "better late than never at all",
             "the pen is mightier than the sword", "when in rome do as the romans do"]
COPY_ASKS = ["Repeat this exactly: {}", "Copy the following text verbatim: {}",
             "Quote word for word: {}", "Return the same text unchanged: {}"]
TOPICS = ["the sea", "a mountain village", "autumn leaves", "a lost key", "the moon",
          "an old library", "a rainy street", "a lighthouse", "spring rain", "a desert road"]
NEW_ASKS = ["Write a short poem about {}.", "Tell me a story about {}.",
            "Describe {} in your own words.", "Brainstorm ideas about {}."]
ANSWER = "gentle whispers drift beyond silver horizons while distant echoes wander freely"


def requests_(n_each: int, offset: int = 0) -> list[tuple[list[dict], str, str]]:
    """(messages, reference, the better backend by construction)."""
    out = []
    for i in range(n_each):
        s = SENTENCES[(i + offset) % len(SENTENCES)]
        out.append(([{"role": "user", "content": COPY_ASKS[(i // 10 + offset) % 4].format(s)}],
                     s, "transformer"))
        t = TOPICS[(i + offset) % len(TOPICS)]
        out.append(([{"role": "user", "content": NEW_ASKS[(i // 10 + offset) % 4].format(t)}],
                     ANSWER, "hybrid"))
    return out


def archroute(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router.cli", *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)


def test_the_loop_explore_feedback_evaluate_retrain_reload(tmp_path: Path) -> None:
    db = tmp_path / "decisions.sqlite"
    profiles = {"archroute-auto": {"policy": "classifier", "epsilon": 0.2},
                "archroute-rules": {"policy": "rules"}}
    router = start(tmp_path, module="tests.router.learning_server", log_prompts=True,
                   profiles=profiles, exploration_seed=11,
                   feedback_rate_per_s=1000, feedback_burst=1000)  # one client, 160 posts
    try:
        served = []
        with httpx.Client(base_url=router.url, headers=AUTH, timeout=30) as c:
            for msgs, ref, better in requests_(40):
                body = c.post("/v1/chat/completions",
                              json={"model": "archroute-auto", "messages": msgs}).json()
                served.append((body["id"], ref, better, body["archroute"]))
                # a reference to score, and the user's verdict on the backend that answered
                r = c.post("/v1/feedback", json={"id": body["id"], "reference": ref})
                assert r.status_code == 200, r.text
                up = body["archroute"]["decision"] == better
                r = c.post("/v1/feedback", json={"id": body["id"],
                                                 "thumbs": "up" if up else "down"})
                assert r.status_code == 200, r.text
            deadline = time.monotonic() + 60
            for rid, *_ in served:
                while (c.get(f"/v1/feedback/{rid}").json()["label"] or {}).get("status") \
                        != "done":
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        explored = [a for *_, a in served if a["explored"]]
        assert 4 <= len(explored) <= 30  # epsilon 0.2 of 80
        assert all(a["propensity"] == pytest.approx(0.2) for a in explored)

        # off-policy evaluation from the log, on both kinds of reward
        res = archroute("eval", "--from-log", str(db), "--reward", "loss", "--bootstrap", "300",
                        "--json", str(tmp_path / "ope.json"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert "| always-transformer |" in res.stdout and "DR direct model" in res.stdout
        ope = json.loads((tmp_path / "ope.json").read_text())
        assert ope["n_used"] == 80 and ope["explored"] == len(explored)
        for name, t in ope["targets"].items():
            dr = t["estimates"]["dr"]
            assert dr["ci"][0] <= dr["value"] <= dr["ci"][1]
            # every row has both losses measured: the estimates can be checked
            assert abs(dr["value"] - t["labelled_value"]) < 0.35, (name, dr, t)
        res = archroute("eval", "--from-log", str(db), "--reward", "feedback",
                        "--bootstrap", "200")
        assert res.returncode == 0 and "feedback reward" in res.stdout, res.stderr[-3000:]

        # retrain from the log (the quick path) and reload it under load
        out = tmp_path / "retrained"
        res = archroute("train", "--from-log", str(db), "--out", str(out))
        assert res.returncode == 0, res.stderr[-3000:]
        assert "self-check passed" in res.stdout and "labelled requests from the log" in res.stdout
        assert "held back for the reload gate" in res.stdout
        sha = artifact.digest(out)
        with Load(router.url, n=8) as load:
            time.sleep(0.5)
            r = httpx.post(router.url + "/admin/reload", headers=AUTH, timeout=60,
                           json={"artifact": str(out)})
            if r.status_code == 409:  # the reload gate: too little held-back evidence here
                err = r.json()["error"]
                assert err["code"] == "gate_refused" and "force" in err["message"], r.text
                assert models(router.url)["archroute-auto"]["artifact"]["sha256"] != sha
                r = httpx.post(router.url + "/admin/reload", headers=AUTH, timeout=60,
                               json={"artifact": str(out), "force": True})
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        assert load.errors == [] and {s for s, _, _ in load.results} == {200}
        assert models(router.url)["archroute-auto"]["artifact"]["sha256"] == sha
        # the new artifact learned the pair's pattern from the log: copying to the
        # transformer, new text to the hybrid (fresh prompts; /v1/route does not explore)
        right = 0
        fresh = requests_(10, offset=5)
        for msgs, _, better in fresh:
            d = httpx.post(router.url + "/v1/route", headers=AUTH,
                           json={"model": "archroute-auto", "messages": msgs}).json()
            assert d["artifact"] == sha[:12]
            right += d["decision"] == better
        assert right >= 0.9 * len(fresh), right
    finally:
        router.stop()
