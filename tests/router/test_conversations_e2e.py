"""Conversations stay on their backend (#24 item 5), for real: ``archroute serve`` under
uvicorn on the embedded pair, driven by the official ``openai`` SDK as a chat app drives it
(the whole history resent at every turn, one turn streamed); two routers sharing a decision
log agree on a conversation; a bad setting stops ``serve`` before it serves."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from router.decision_log import read_log
from router.policies import decide
from tests.router.pg import started_cluster
from tests.router.servers import ROOT, Server, reference_available, serve_config

pytestmark = pytest.mark.slow

TURNS = ["Write a short poem about the sea at dusk.",  # rules: no cue, the hybrid
         "Repeat this exactly: the sea, the sea, the grey sea.",  # a copy cue, the transformer
         "Thank you. Now tell me about the moon."]


def converse(c: openai.OpenAI, model: str) -> list[tuple[dict[str, str], dict]]:
    """Three turns, the second streamed: each turn's headers and ``archroute`` object."""
    msgs: list = []
    out = []
    for i, text in enumerate(TURNS):
        msgs.append({"role": "user", "content": text})
        if i == 1:
            sraw = c.chat.completions.with_raw_response.create(
                model=model, messages=msgs, max_tokens=6, temperature=0, stream=True)
            chunks = list(sraw.parse())
            answer = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            headers, body = dict(sraw.headers), (chunks[0].model_extra or {})["archroute"]
        else:
            raw = c.chat.completions.with_raw_response.create(
                model=model, messages=msgs, max_tokens=6, temperature=0)
            resp = raw.parse()
            answer = resp.choices[0].message.content or ""
            headers, body = dict(raw.headers), (resp.model_extra or {})["archroute"]
        msgs.append({"role": "assistant", "content": answer})
        out.append((headers, body))
    return out


@pytest.mark.skipif(not reference_available(), reason="embedded reference pair not built yet")
def test_a_conversation_stays_on_one_backend(tmp_path: Path) -> None:
    router = serve_config({
        "profiles": {"stay": {"policy": "rules", "conversation": {"handoff_cost": 1000}},
                     "follow": {"policy": "rules", "conversation": {"handoff_cost": 0}}},
        "decision_log": str(tmp_path / "d.sqlite"), "torch_threads": 1}, tmp_path)
    try:
        c = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        stay = converse(c, "stay")
        backends = {h["x-archroute-backend"] for h, _ in stay}
        assert backends == {"reference-hybrid"}, stay  # all three turns on the first one
        _, second = stay[1]
        assert decide(second["score"], second["threshold"]) == "transformer"  # not the pick
        assert second["conversation"]["outcome"] == "kept"
        assert stay[2][0]["x-archroute-conversation"].split(";")[0] in ("kept", "same")
        assert stay[2][1]["conversation"]["tokens"] > second["conversation"]["tokens"]

        follow = converse(c, "follow")  # handoff_cost 0: every turn where the policy says
        for h, body in follow:
            assert h["x-archroute-backend"] == "reference-" + decide(body["score"],
                                                                     body["threshold"])
        assert follow[1][1]["conversation"]["outcome"] == "switched"
        metrics = httpx.get(router.url + "/metrics").text
        assert 'archroute_conversation_turns_total{outcome="kept",profile="stay"}' in metrics
        assert ('archroute_conversation_turns_total{outcome="switched",profile="follow"}'
                in metrics)
    finally:
        router.stop()


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster (tests/router/pg.py); skipped, saying why, where none
    can start."""
    with started_cluster() as c:
        yield c


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_replicas_agree_through_the_decision_log(tmp_path: Path, store: str,
                                                 request: pytest.FixtureRequest) -> None:
    """Turn 1 on router A, turn 2 on router B (two processes sharing one decision log, a
    SQLite file or a PostgreSQL database): B finds the turn in the log and keeps it."""
    dlog = (str(tmp_path / "d.sqlite") if store == "sqlite"
            else request.getfixturevalue("postgres").database())
    config = {"backends": {"transformer": {"name": "t-fake", "kind": "fake",
                                           "fake_reply": "from the transformer"},
                           "hybrid": {"name": "h-fake", "kind": "fake",
                                      "fake_reply": "from the hybrid"}},
              "profiles": {"stay": {"policy": "rules", "conversation": {"handoff_cost": 1000}}},
              "decision_log": dlog}
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(config))
    # one after the other: two processes creating one new SQLite log at once can both add
    # its columns (a race in SQLiteStore.connect, reported; PostgreSQL takes a lock)
    a = Server(["serve", "--config", str(tmp_path / "router.yaml")],
               log_path=tmp_path / "a.log").wait_ready()
    b = Server(["serve", "--config", str(tmp_path / "router.yaml")], log_path=tmp_path / "b.log")
    try:
        b.wait_ready()
        ca, cb = (openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
                  for s in (a, b))
        msgs: list = [{"role": "user", "content": TURNS[0]}]
        first = ca.chat.completions.with_raw_response.create(model="stay", messages=msgs)
        assert first.headers["x-archroute-backend"] == "h-fake"
        msgs += [{"role": "assistant", "content": first.parse().choices[0].message.content},
                 {"role": "user", "content": TURNS[1]}]
        deadline = time.monotonic() + 10  # A's writer commits every 50 ms batch window
        while not read_log(dlog) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = cb.chat.completions.with_raw_response.create(model="stay", messages=msgs)
        assert second.headers["x-archroute-conversation"].startswith("kept; earlier=hybrid")
        assert second.headers["x-archroute-backend"] == "h-fake"
    finally:
        a.stop()
        b.stop()


def test_a_bad_conversation_setting_stops_serve(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(
        {"profiles": {"p": {"policy": "rules", "conversation": {"handoff_cost": -1}}}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--config",
                        str(tmp_path / "bad.yaml"), "--port", "0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "profiles.p.conversation.handoff_cost" in r.stderr and "Traceback" not in r.stderr
