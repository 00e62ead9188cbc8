"""The router app in-process on fake backends: protocol, errors, routing, fallback, limits."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.base import RequestError
from tests.router.conftest import Fakes, assert_envelope

COPY = [{"role": "user", "content": "Repeat this exactly: the cat sat on the mat."}]
PROSE = [{"role": "user", "content": "Write a short poem about the sea at dusk."}]


def chat(client: TestClient, messages=PROSE, model: str = "archroute-rules", **kw):
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, **kw},
                       headers=kw.pop("headers", None))


def test_routes_by_policy_and_says_so(fakes) -> None:
    f, client = fakes
    r = chat(client, COPY)
    assert r.status_code == 200
    assert r.headers["x-archroute-backend"] == "t-fake"
    assert r.headers["x-archroute-policy"] == "rules"
    assert float(r.headers["x-archroute-score"]) >= 0.5
    assert float(r.headers["x-archroute-overhead-ms"]) >= 0
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "from transformer"
    assert body["archroute"]["decision"] == "transformer"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 2
    r = chat(client, PROSE)
    assert r.headers["x-archroute-backend"] == "h-fake"
    assert r.json()["choices"][0]["message"]["content"] == "from hybrid"


def test_backend_by_name_bypasses_routing(fakes) -> None:
    _, client = fakes
    r = chat(client, COPY, model="h-fake")
    assert r.headers["x-archroute-backend"] == "h-fake"
    assert r.headers["x-archroute-policy"] == "direct"
    assert "x-archroute-score" not in r.headers


def test_request_threshold_extension(fakes) -> None:
    _, client = fakes
    r = chat(client, PROSE, archroute={"threshold": 0.0})
    assert r.headers["x-archroute-backend"] == "t-fake"


def test_completions_n_stop_echo_and_max_tokens(fakes) -> None:
    f, client = fakes
    f.hybrid.enqueue("one two three four", "one two three four")
    r = client.post("/v1/completions", json={"model": "archroute-rules", "prompt": "Say:",
                                             "n": 2, "stop": [" three"], "echo": True})
    choices = r.json()["choices"]
    assert [c["text"] for c in choices] == ["Say:one two", "Say:one two"]
    r = client.post("/v1/completions", json={"model": "archroute-rules", "prompt": "x",
                                             "max_tokens": 1})
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_a_token_id_prompt_is_the_clients_error_at_the_router(fakes) -> None:
    """The router routes on text; token ids are for serve-model and engines."""
    _, client = fakes
    for model in ("archroute-rules", "t-fake"):
        r = client.post("/v1/completions", json={"model": model, "prompt": [1, 2, 3]})
        err = assert_envelope(r, 400)
        assert err["type"] == "invalid_request_error" and "token ids" in err["message"]


def test_models_and_health(fakes) -> None:
    _, client = fakes
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert {"archroute-auto", "archroute-rules", "t-fake", "h-fake"} <= set(ids)
    assert client.get("/v1/models/t-fake").json()["architecture"] == "transformer"
    assert_envelope(client.get("/v1/models/nope"), 404, "model_not_found")
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["ready"] is True


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (json.dumps({"model": 3, "messages": PROSE}).encode(), "model"),
    (json.dumps({"model": "archroute", "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": "archroute", "messages": PROSE, "temperature": 9}).encode(),
     "temperature"),
    (json.dumps({"model": "archroute", "messages": []}).encode(), "messages"),
])
def test_invalid_requests_are_400(fakes, body: bytes, param: str | None) -> None:
    _, client = fakes
    r = client.post("/v1/chat/completions", content=body,
                    headers={"content-type": "application/json"})
    err = assert_envelope(r, 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_unknown_model_404_and_unknown_fields_ignored(fakes) -> None:
    _, client = fakes
    assert_envelope(chat(client, model="gpt-4o"), 404, "model_not_found")
    assert chat(client, some_future_field={"x": 1}).status_code == 200


def test_oversize_body_413(tmp_path: Path) -> None:
    f = Fakes(tmp_path, max_body_bytes=2048)
    with TestClient(f.app) as client:
        big = [{"role": "user", "content": "x" * 5000}]
        assert_envelope(chat(client, big), 413, "request_too_large")

        def chunks():  # no content-length: counted while reading
            yield json.dumps({"model": "archroute", "messages": big}).encode()

        r = client.post("/v1/chat/completions", content=chunks(),
                        headers={"content-type": "application/json"})
        assert_envelope(r, 413, "request_too_large")


def test_api_keys_401(tmp_path: Path) -> None:
    f = Fakes(tmp_path, api_keys=["sekret"])
    with TestClient(f.app) as client:
        assert_envelope(chat(client), 401, "invalid_api_key")
        assert_envelope(chat(client, headers={"Authorization": "Bearer nope"}), 401)
        assert chat(client, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert client.get("/health").status_code == 200  # probes need no key


def test_fallback_before_first_byte(fakes) -> None:
    f, client = fakes
    f.transformer.fail(1)
    r = chat(client, COPY)
    assert r.status_code == 200
    assert r.headers["x-archroute-backend"] == "h-fake"
    assert r.headers["x-archroute-fallback"].startswith("t-fake")
    assert r.json()["archroute"]["fallback_from"] == "t-fake"
    f.transformer.fail(1)
    r = chat(client, COPY, stream=True)
    assert r.status_code == 200 and r.headers["x-archroute-backend"] == "h-fake"
    assert "from hybrid" in "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in r.text.splitlines() if line.startswith("data: {") and '"choices": [{' in line)
    metrics = client.get("/metrics").text
    assert 'archroute_fallbacks_total{from_backend="t-fake",to_backend="h-fake"} 2.0' in metrics


def test_both_fail_502_and_direct_has_no_fallback(fakes) -> None:
    f, client = fakes
    f.transformer.fail(1)
    f.hybrid.fail(1)
    assert_envelope(chat(client, COPY), 502, "backend_failed")
    f.hybrid.fail(1)
    assert_envelope(chat(client, model="h-fake"), 502)


def test_breaker_cools_down_and_probes(tmp_path: Path) -> None:
    f = Fakes(tmp_path, failure_threshold=2, cooldown_s=0.3)
    with TestClient(f.app) as client:
        f.transformer.fail(2)
        chat(client, COPY)
        chat(client, COPY)
        n_calls = len(f.transformer.calls)
        r = chat(client, COPY)  # breaker open: goes straight to the hybrid
        assert r.headers["x-archroute-backend"] == "h-fake"
        assert "backend_unavailable" in r.headers["x-archroute-fallback"]
        assert len(f.transformer.calls) == n_calls
        ready = client.get("/ready").json()
        assert ready["ready"] and ready["backends"]["t-fake"]["state"] == "open"
        time.sleep(0.35)
        r = chat(client, COPY)  # probe succeeds: closed again
        assert r.headers["x-archroute-backend"] == "t-fake"
        assert client.get("/ready").json()["backends"]["t-fake"]["state"] == "closed"


def test_timeout_504_and_overload_429(tmp_path: Path) -> None:
    f = Fakes(tmp_path, fallback=False, backends={
        "transformer": {"name": "t-fake", "kind": "fake", "timeout_s": 0.2},
        "hybrid": {"name": "h-fake", "kind": "fake", "max_concurrency": 1, "max_queue": 0}})
    with TestClient(f.app) as client:
        f.transformer.delay_s = 0.5
        assert_envelope(chat(client, COPY), 504, "backend_timeout")
        slot = f.app.state.service.slots["hybrid"]
        slot.in_flight = 1  # pretend the only slot is taken
        assert_envelope(chat(client, PROSE), 429, "backend_overloaded")
        slot.in_flight = 0


def test_stream_events_and_mid_stream_error(fakes) -> None:
    f, client = fakes
    r = chat(client, PROSE, stream=True, stream_options={"include_usage": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert objs[0]["archroute"]["backend"] == "h-fake"
    assert objs[-1]["usage"]["completion_tokens"] == 2  # "from", " hybrid"
    assert objs[-2]["choices"][0]["finish_reason"] == "stop"

    def broken(prompt, params):
        yield from f.hybrid.__class__.stream(f.hybrid, prompt, params)
        raise RuntimeError("died mid-stream")

    f.hybrid.stream = broken  # type: ignore[method-assign]
    r = chat(client, PROSE, stream=True)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    msg = json.loads(events[-2])["error"]["message"]  # the kind of failure, not its text
    assert "RuntimeError" in msg and "died mid-stream" not in msg


def test_decision_log_rows(tmp_path: Path) -> None:
    f = Fakes(tmp_path)
    with TestClient(f.app) as client:
        chat(client, COPY)
        chat(client, model="nope")
    rows = sqlite3.connect(tmp_path / "decisions.sqlite").execute(
        "SELECT model, policy, decision, backend, status, features, prompt FROM decisions"
        " ORDER BY id").fetchall()
    assert rows[0][:5] == ("archroute-rules", "rules", "transformer", "t-fake", 200)
    assert json.loads(rows[0][5])["copy_cue"] == 1.0
    assert rows[0][6] is None  # no prompt text unless enabled
    assert rows[1][4] == 404
    mode = sqlite3.connect(tmp_path / "decisions.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)


def test_body_and_log_row_are_one_record(tmp_path: Path) -> None:
    """The `archroute` object and the decision-log row come from one record (#13): every
    field both show agrees, through a fallback and a streamed answer; a request every backend
    failed logs no backend and no fallback."""
    f = Fakes(tmp_path)
    with TestClient(f.app) as client:
        bodies = [chat(client, COPY).json()["archroute"]]
        f.transformer.fail(1)
        bodies.append(chat(client, COPY).json()["archroute"])
        r = chat(client, COPY, stream=True)
        first = next(json.loads(line[6:]) for line in r.text.splitlines()
                     if line.startswith("data: {"))
        bodies.append(first["archroute"])
        bodies.append(chat(client, model="h-fake").json()["archroute"])
        f.transformer.fail(1)
        f.hybrid.fail(1)
        assert_envelope(chat(client, COPY), 502)
    f.app.state.service.decision_log.flush()
    db = sqlite3.connect(tmp_path / "decisions.sqlite")
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM decisions ORDER BY id")]
    same = {"profile": "profile", "policy": "policy", "score": "score", "threshold": "threshold",
            "decision": "decision", "backend": "backend", "fallback_from": "fallback_from",
            "side_request": "side", "propensity": "propensity", "explored": "explored"}
    for body, row in zip(bodies, rows, strict=False):
        assert {k: body[k] for k in same} == {k: row[c] for k, c in same.items()}
    assert bodies[1]["fallback_from"] == "t-fake" and bodies[3]["policy"] is None
    assert rows[4]["decision"] == "transformer" and rows[4]["status"] == 502
    assert rows[4]["backend"] is None and rows[4]["fallback_from"] is None


def test_request_errors_do_not_fall_back(fakes) -> None:
    f, client = fakes

    def too_long(prompt, params):
        raise RequestError("prompt + max_tokens exceeds the context length")

    f.transformer.generate = too_long  # type: ignore[method-assign]
    err = assert_envelope(chat(client, COPY), 400)
    assert "context length" in err["message"]
    assert f.hybrid.calls == []
    assert f.app.state.service.slots["transformer"].failures == 0


# --- hostile input (#12): every numeric field bounded, text that is not Unicode refused,
# none of it reaching a backend, the breaker or the fallback --------------------------------

def _raw(client: TestClient, body: str):
    return client.post("/v1/chat/completions", content=body.encode(),
                       headers={"content-type": "application/json"})


@pytest.mark.parametrize("field,value", [
    ("max_tokens", "1" + "0" * 400),          # a JSON integer past any machine integer
    ("max_completion_tokens", "1" + "0" * 20),
    ("seed", "1" + "0" * 30),
    ("presence_penalty", "1e999"),            # parses to infinity
    ("frequency_penalty", "-1e999"),
    ("top_logprobs", "100000"),
])
def test_out_of_range_numbers_are_400_naming_the_field(fakes, field: str, value: str) -> None:
    f, client = fakes
    body = ('{"model": "archroute-rules", "messages": [{"role": "user", "content": "hi"}], '
            f'"{field}": {value}}}')
    err = assert_envelope(_raw(client, body), 400)
    assert err["param"] == field, err
    assert f.transformer.calls == [] and f.hybrid.calls == []


@pytest.mark.parametrize("where", ["content", "stop", "model", "parts"])
def test_unpaired_surrogates_are_400_and_never_reach_a_backend(fakes, where: str) -> None:
    f, client = fakes
    msg = '{"role": "user", "content": "hi \\ud800 there"}'
    extra = ""
    model = "archroute-rules"
    if where == "stop":
        msg, extra = '{"role": "user", "content": "hi"}', ', "stop": ["\\udfff"]'
    elif where == "model":
        msg, model = '{"role": "user", "content": "hi"}', "archroute\\ud800"
    elif where == "parts":
        msg = '{"role": "user", "content": [{"type": "text", "text": "a\\ud83d"}]}'
    body = f'{{"model": "{model}", "messages": [{msg}]{extra}}}'
    for _ in range(4):  # more than the failure threshold: nothing may count against a backend
        err = assert_envelope(_raw(client, body), 400)
        if where in ("content", "stop"):
            assert "surrogate" in err["message"]
    svc = f.app.state.service
    assert f.transformer.calls == [] and f.hybrid.calls == []
    assert all(s.failures == 0 and s.state == "closed" for s in svc.slots.values())
    assert chat(client).status_code == 200  # and the router still serves


def test_a_model_name_is_capped(fakes) -> None:
    _, client = fakes
    r = chat(client, model="m" * 300_000)
    err = assert_envelope(r, 400)
    assert err["param"] == "model" and len(r.content) < 2_000


def test_sampling_values_that_underflow_decode_greedily() -> None:
    from router.protocol import ChatCompletionRequest

    msgs = [{"role": "user", "content": "hi"}]
    for kw in ({"temperature": 1e-300}, {"top_p": 5e-324}, {"temperature": 0.0}):
        r = ChatCompletionRequest(model="m", messages=msgs, **kw)
        assert r.temperature == 0.0 and r.top_p == 1.0
    r = ChatCompletionRequest(model="m", messages=msgs, temperature=0.7, top_p=0.9)
    assert (r.temperature, r.top_p) == (0.7, 0.9)


def test_the_sampler_survives_a_temperature_that_underflows() -> None:
    import torch

    from models.hf import sample_next

    logits = torch.tensor([0.1, 3.0, -2.0])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, 1e-300, 1.0, gen) == 1
    assert sample_next(logits, 1.0, 5e-324, gen) == 1


# --- one deadline per request, end to end (#12 defect 4) -----------------------------------

def _hung(tmp_path: Path, delay: float = 1.5, timeout: float = 0.5) -> Fakes:
    f = Fakes(tmp_path, backends={
        "transformer": {"name": "t-fake", "kind": "fake", "timeout_s": timeout,
                        "max_concurrency": 1, "queue_timeout_s": 30},
        "hybrid": {"name": "h-fake", "kind": "fake", "timeout_s": timeout,
                   "max_concurrency": 1, "queue_timeout_s": 30}})
    f.transformer.delay_s = f.hybrid.delay_s = delay
    return f


@pytest.mark.parametrize("stream", [False, True])
def test_both_backends_hung_504_within_one_timeout(tmp_path: Path, stream: bool) -> None:
    f = _hung(tmp_path)
    with TestClient(f.app) as client:
        t = time.perf_counter()
        r = chat(client, COPY, stream=stream)
        took = time.perf_counter() - t
    assert_envelope(r, 504, "backend_timeout")
    assert took < 0.5 + 0.3, took  # one timeout_s, not one per backend (1.0 before)


def test_a_request_queued_behind_a_hung_backend_waits_one_timeout(tmp_path: Path) -> None:
    import concurrent.futures

    f = _hung(tmp_path, delay=1.5, timeout=0.4)
    with TestClient(f.app) as client:
        body = {"model": "t-fake", "messages": PROSE}  # the transformer only: no fallback
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v1/chat/completions", json=body)
            time.sleep(0.1)
            t = time.perf_counter()
            second = pool.submit(client.post, "/v1/chat/completions", json=body).result()
            took = time.perf_counter() - t
            assert_envelope(first.result(), 504, "backend_timeout")
    assert_envelope(second, 504, "backend_timeout")
    assert took < 0.4 + 0.25, took  # its own deadline, not the queue's 30 s or 2 x 0.4


# --- what clients see of internals (#12 defect 6) -------------------------------------------

def test_backend_internals_do_not_reach_clients(fakes) -> None:
    f, client = fakes

    def crash(prompt, params):
        raise RuntimeError("CUDA error at /home/secret/model.py:42: device-side assert")

    f.transformer.generate = f.hybrid.generate = crash  # type: ignore[method-assign]
    r = chat(client, COPY)
    err = assert_envelope(r, 502, "backend_failed")
    assert "secret" not in r.text and "CUDA" not in r.text
    assert "RuntimeError" in err["message"]  # the kind of failure, not its text


def test_openapi_documents_400_not_422(fakes) -> None:
    _, client = fakes
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in responses and "400" in responses
    assert "HTTPValidationError" not in schema.get("components", {}).get("schemas", {})


def test_after_bad_requests_a_healthy_backend_is_back_within_one_cool_down(tmp_path: Path) -> None:
    """The breaker opens; during and after the cool-down come requests that are the client's
    fault (too long for the context, a lone surrogate, an out-of-range number) and a stream
    the client abandons; the next good request is served by the recovered backend."""
    f = Fakes(tmp_path, failure_threshold=2, cooldown_s=0.3)
    original = f.transformer.generate

    def picky(prompt, params):
        if "too long" in str(prompt):
            raise RequestError("prompt + max_tokens exceeds the context length")
        return original(prompt, params)

    f.transformer.generate = picky  # type: ignore[method-assign]
    too_long = [{"role": "user", "content": "Repeat this exactly, it is too long: a b c"}]
    with TestClient(f.app) as client:
        f.transformer.fail(2)
        chat(client, COPY, model="t-fake")
        chat(client, COPY, model="t-fake")
        slot = f.app.state.service.slots["transformer"]
        assert slot.state == "open"
        time.sleep(0.35)
        assert_envelope(chat(client, too_long, model="t-fake"), 400)  # the probe: client's fault
        assert_envelope(_raw(client, '{"model": "t-fake", "messages": '
                                     '[{"role": "user", "content": "\\ud800"}]}'), 400)
        assert_envelope(chat(client, COPY, model="t-fake", max_tokens=10**20), 400)
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": "t-fake", "messages": COPY, "stream": True}) as r:
            next(r.iter_lines())  # the client reads one event and leaves
        t = time.perf_counter()
        r = chat(client, COPY, model="t-fake")
        assert r.status_code == 200 and r.headers["x-archroute-backend"] == "t-fake"
        assert slot.state == "closed" and time.perf_counter() - t < 0.3


def test_a_backends_stray_value_error_is_a_backend_failure_not_a_400(fakes) -> None:
    """Only RequestError says "the request is wrong"; a plain ValueError from a backend (a
    bug) falls back to the other backend and counts against the failing one."""
    f, client = fakes

    def buggy(prompt, params):
        raise ValueError("could not broadcast input array from shape (3,) into shape (2,)")

    f.transformer.generate = buggy  # type: ignore[method-assign]
    r = chat(client, COPY)
    assert r.status_code == 200 and r.headers["x-archroute-backend"] == "h-fake"
    assert "backend_failed" in r.headers["x-archroute-fallback"]
    assert f.app.state.service.slots["transformer"].failures == 1
    assert "broadcast" not in r.text


def test_generation_params_are_built_once_per_request(fakes, monkeypatch) -> None:
    """One GenerationParams per request, reused across the n choices (seed + i) and a
    fallback, never rebuilt from the body (they used to be built three times)."""
    from router.serving import RouterService

    f, client = fakes
    built = []
    original = RouterService.params

    def counting(self, body, i=0):
        built.append(i)
        return original(self, body, i)

    monkeypatch.setattr(RouterService, "params", counting)
    f.transformer.fail(1)  # the first backend fails: the fallback reuses the same params
    r = client.post("/v1/chat/completions", json={
        "model": "archroute-rules", "messages": [{"role": "user", "content": "Repeat: a b c"}],
        "n": 3, "seed": 7, "max_tokens": 4})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    assert built == [0]
