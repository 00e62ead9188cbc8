"""Backend.score_prompt, the prompt probe's input (issue #24 item 4): in-process it is what
``archroute label`` records from the same forward; over HTTP (a real serve-model process)
the same numbers come back through echo + logprobs and vLLM's prompt_logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from classifiers.probe import probe_of_scores
from models.base import BackendError, ChatMessage, RequestError, TokenIds
from models.fake import COPY_LOGPROB, FakeBackend, fake_logprob, fake_tokens
from models.upstream import OpenAIUpstreamBackend
from router.probing import ProbeMismatchError, probe_of
from tests.router.servers import Server, reference_available

CODE = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return"
CHAT = [ChatMessage("system", "Be brief."), ChatMessage("user", "Say it twice: red door, red door")]


def test_fake_prompt_scores_are_deterministic_and_copy_aware() -> None:
    t, h = FakeBackend("t", "transformer"), FakeBackend("h", "hybrid")
    text = "one two one two"
    st, sh = t.score_prompt(text), h.score_prompt(text)
    assert st.pieces == sh.pieces == fake_tokens(text) and st.ids is None
    assert sh.logprobs == [fake_logprob(p) for p in sh.pieces]
    assert st.logprobs[2:] == [COPY_LOGPROB, COPY_LOGPROB]  # seen before: the transformer copies
    assert probe_of(st, sh)["probe_gap"] < 0 and t.score_prompt(CHAT) == t.score_prompt(CHAT)
    h.fail(1)
    with pytest.raises(BackendError):
        h.score_prompt(text)
    with pytest.raises(ProbeMismatchError):
        probe_of(st, h.score_prompt("other words"))
    with pytest.raises(RequestError):
        t.score_prompt(TokenIds((1, 2)))


@pytest.mark.skipif(not reference_available(), reason="embedded reference pair not built yet")
def test_in_process_equals_what_label_records(reference_pair) -> None:
    t, h = reference_pair
    st, sh = t.score(CODE, " a + b"), h.score(CODE, " a + b")
    pt, ph = t.score_prompt(CODE), h.score_prompt(CODE)
    assert pt.ids == st.prompt_ids and np.allclose(pt.logprobs, st.prompt_logprobs, atol=1e-4)
    assert "".join(pt.pieces) == CODE
    label, served = probe_of_scores(t.tokenizer, st, sh), probe_of(pt, ph)
    assert label is not None
    assert served == pytest.approx(label, abs=1e-4, nan_ok=True)
    # a conversation is read as generation reads it: the rendered prompt after the start token
    chat = t.score_prompt(CHAT)
    assert [t.prefix_id, *chat.ids] == t.prompt_ids(CHAT)
    # longer than the context: its last context_length ids, as generation would refuse
    long = t.score_prompt(TokenIds(tuple([5, 6, 7, 8] * (t.context_length // 2))))
    assert len(long.logprobs) == t.context_length - 1


@pytest.fixture(scope="module")
def fake_server():
    srv = Server(["serve-model", "fake", "--name", "up-fake"]).wait_ready()
    yield srv
    srv.stop()


def test_upstream_asks_echo_or_prompt_logprobs(fake_server: Server) -> None:
    up = OpenAIUpstreamBackend("up", fake_server.url + "/v1", "up-fake", timeout=10)
    local = FakeBackend("local")
    try:
        text = "alpha beta gamma alpha beta"
        got = up.score_prompt(text)  # echo: the first token has no log-probability
        want = local.score_prompt(text)
        assert got.pieces == want.pieces[1:] and got.logprobs == pytest.approx(want.logprobs[1:])
        chat = up.score_prompt(CHAT)  # prompt_logprobs on /chat/completions
        want = local.score_prompt(CHAT)
        assert chat.pieces == want.pieces and chat.logprobs == pytest.approx(want.logprobs)
    finally:
        up.close()


def test_serve_model_refuses_top_prompt_logprobs(fake_server: Server) -> None:
    import httpx

    r = httpx.post(fake_server.url + "/v1/chat/completions", json={
        "model": "up-fake", "messages": [{"role": "user", "content": "hi"}],
        "prompt_logprobs": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


@pytest.mark.slow
@pytest.mark.skipif(not reference_available(), reason="embedded reference pair not built yet")
def test_upstream_equals_in_process_on_the_reference(reference_pair) -> None:
    srv = Server(["serve-model", "reference:transformer", "--name", "ref-t",
                  "--torch-threads", "1"]).wait_ready()
    up = OpenAIUpstreamBackend("up", srv.url + "/v1", "ref-t", timeout=60)
    try:
        local = reference_pair[0]
        chat, want = up.score_prompt(CHAT), local.score_prompt(CHAT)
        assert chat.ids == want.ids and chat.logprobs == pytest.approx(want.logprobs, abs=1e-3)
        text = up.score_prompt(CODE)
        want = local.score_prompt(CODE)
        assert "".join(text.pieces) == "".join(want.pieces[1:])
        assert text.logprobs == pytest.approx(want.logprobs[1:], abs=1e-3)
    finally:
        up.close()
        srv.stop()
