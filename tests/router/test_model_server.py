"""serve-model in-process: echo + logprobs the way vLLM answers them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from models.fake import FakeBackend, fake_logprob, fake_tokens
from router.model_server import create_model_app


@pytest.fixture()
def client():
    backend = FakeBackend("m", default_reply=" and more words")
    with TestClient(create_model_app(backend)) as c:
        yield c


def test_echo_logprobs_like_vllm(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "m", "prompt": "The cat sat",
                                              "echo": True, "logprobs": 1, "max_tokens": 1})
    choice = r.json()["choices"][0]
    assert choice["text"] == "The cat sat and"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["The", " cat", " sat", " and"]
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([fake_logprob(t) for t in lp["tokens"][1:]])
    assert lp["text_offset"] == [0, 3, 7, 11]
    assert lp["top_logprobs"][1] == {" cat": pytest.approx(fake_logprob(" cat"))}


def test_logprobs_without_echo_offsets_follow_prompt(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "m", "prompt": "Hi", "logprobs": 1,
                                              "max_tokens": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == fake_tokens(" and more")
    assert lp["text_offset"] == [2, 6]


def test_wrong_model_404_and_chat(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2})
    assert r.json()["choices"][0]["message"]["content"] == " and more"
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert r.status_code == 400
