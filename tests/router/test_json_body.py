"""JSON bodies are read as JSON whatever content type the client sent (issue #27 item 1:
docs/learning-loop.md's `curl -d '{...}'` sends a form's content type and got "Input should
be a valid dictionary")."""

from __future__ import annotations

import json

import pytest

from tests.router.conftest import assert_envelope

CHAT = {"model": "archroute-rules", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4}


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain", None])
def test_chat_body_read_as_json(fakes, ctype):
    _, client = fakes
    headers = {"content-type": ctype} if ctype else {}
    r = client.post("/v1/chat/completions", content=json.dumps(CHAT), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"


def test_feedback_body_read_as_json(fakes):
    _, client = fakes
    rid = client.post("/v1/chat/completions", json=CHAT).json()["id"]
    r = client.post("/v1/feedback", content=json.dumps({"id": rid, "reward": 1.0}),
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text


def test_not_json_says_so(fakes):
    _, client = fakes
    r = client.post("/v1/chat/completions", content="model=archroute&x=1",
                    headers={"content-type": "application/x-www-form-urlencoded"})
    err = assert_envelope(r, 400)
    assert "json" in err["message"].lower()
