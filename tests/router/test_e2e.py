"""The router under uvicorn in a subprocess, driven by the official ``openai`` SDK, unchanged.

The upstream path runs for real: two ``archroute serve-model`` processes as the backends.
Killing one mid-test must not surface as a client error (fallback).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import yaml

from tests.router.servers import CODE_GEN, Server, reference_available

KEY = "test-key"
COPY = [{"role": "user", "content": "Repeat this exactly: the cat sat on the mat."}]
PROSE = [{"role": "user", "content": "Write a short poem about the sea at dusk."}]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    ups = {
        "transformer": Server(["serve-model", "fake", "--name", "up-transformer",
                               "--fake-reply", "from the transformer upstream"]),
        "hybrid": Server(["serve-model", "fake", "--name", "up-hybrid",
                          "--fake-reply", "from the hybrid upstream"]),
    }
    config = {
        "backends": {role: {"name": f"up-{role}", "kind": "upstream", "base_url": s.url + "/v1",
                            "model": f"up-{role}", "timeout_s": 5}
                     for role, s in ups.items()},
        "api_keys": [KEY],
        "max_body_bytes": 4096,
        "decision_log": str(tmp / "decisions.sqlite"),
    }
    (tmp / "router.yaml").write_text(yaml.safe_dump(config))
    router = Server(["serve", "--config", str(tmp / "router.yaml")], log_path=tmp / "router.log")
    for s in [*ups.values(), router]:
        s.wait_ready()
    yield router, ups
    for s in [router, *ups.values()]:
        s.stop()


def client(router: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=KEY, max_retries=0)


def test_sdk_sync(stack) -> None:
    router, _ = stack
    c = client(router)
    raw = c.chat.completions.with_raw_response.create(model="archroute-rules", messages=COPY)
    assert raw.headers["x-archroute-backend"] == "up-transformer"
    assert raw.headers["x-archroute-policy"] == "rules"
    resp = raw.parse()
    assert resp.choices[0].message.content == "from the transformer upstream"
    assert resp.usage.completion_tokens == 4
    r = c.completions.create(model="archroute-rules", prompt="Once upon a time", max_tokens=3)
    assert r.choices[0].text == "from the hybrid"
    assert {m.id for m in c.models.list()} >= {"archroute-auto", "up-transformer", "up-hybrid"}


def test_sdk_stream(stack) -> None:
    router, _ = stack
    c = client(router)
    stream = c.chat.completions.create(model="archroute", messages=CODE_GEN, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "from the hybrid upstream"
    assert chunks[-1].usage.completion_tokens == 4
    stream = c.completions.create(model="archroute-rules", prompt="x", stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == "from the hybrid upstream"


def test_sdk_async(stack) -> None:
    router, _ = stack

    async def main() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key=KEY, max_retries=0)
        reqs = [ac.chat.completions.create(model="archroute-rules", messages=m)
                for m in (COPY, PROSE) * 4]
        out = [r.choices[0].message.content for r in await asyncio.gather(*reqs)]
        stream = await ac.chat.completions.create(model="up-hybrid", messages=COPY, stream=True)
        out.append("".join([ch.choices[0].delta.content or "" async for ch in stream]))
        await ac.close()
        return out

    out = asyncio.run(main())
    assert out[:2] == ["from the transformer upstream", "from the hybrid upstream"]
    assert out[-1] == "from the hybrid upstream"


def test_sdk_errors(stack) -> None:
    router, _ = stack
    c = client(router)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=PROSE)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="archroute", messages=PROSE, temperature=9)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=router.url + "/v1", api_key="wrong", max_retries=0) \
            .chat.completions.create(model="archroute", messages=PROSE)
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="archroute", messages=[{"role": "user",
                                                                 "content": "x" * 10_000}])
    assert e.value.status_code == 413
    r = httpx.post(router.url + "/v1/chat/completions", content=b"{oops",
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_kill_upstream_falls_back(stack) -> None:
    """Runs last in this module: it kills the transformer's server."""
    router, ups = stack
    c = client(router)
    ups["transformer"].kill()
    for _ in range(4):  # past the breaker threshold too
        raw = c.chat.completions.with_raw_response.create(model="archroute-rules", messages=COPY)
        assert raw.headers["x-archroute-backend"] == "up-hybrid"
        assert raw.headers["x-archroute-fallback"].startswith("up-transformer")
        assert raw.parse().choices[0].message.content == "from the hybrid upstream"
    stream = c.chat.completions.create(model="archroute-rules", messages=COPY, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == \
        "from the hybrid upstream"
    ready = httpx.get(router.url + "/ready").json()
    assert ready["ready"] and ready["backends"]["up-transformer"]["state"] == "open"
    metrics = httpx.get(router.url + "/metrics").text
    assert "archroute_fallbacks_total" in metrics


@pytest.mark.skipif(not reference_available(), reason="embedded reference pair not built yet")
def test_default_router_on_the_embedded_pair(tmp_path) -> None:
    """`archroute serve` with no config serves the in-process reference pair, and
    `archroute` is span routing on it (the request classifier stays as archroute-auto)."""
    router = Server(["serve", "--decision-log", str(tmp_path / "d.sqlite")],
                    env={"ARCHROUTE_TORCH_THREADS": "1"}, log_path=tmp_path / "router.log")
    try:
        router.wait_ready(timeout_s=180)
        c = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        raw = c.chat.completions.with_raw_response.create(
            model="archroute", messages=COPY, max_tokens=8, temperature=0)
        assert raw.headers["x-archroute-profile"] == "archroute-span"
        assert raw.headers["x-archroute-backend"].startswith("span:")
        resp = raw.parse()
        assert 1 <= resp.usage.completion_tokens <= 8
        assert c.models.retrieve("archroute").model_extra["routing"] == "span"
        raw = c.chat.completions.with_raw_response.create(
            model="archroute-auto", messages=COPY, max_tokens=8, temperature=0)
        assert raw.headers["x-archroute-backend"] in ("reference-transformer", "reference-hybrid")
        stream = c.completions.create(model="reference-hybrid", prompt="def main(", max_tokens=8,
                                      temperature=0, stream=True)
        assert isinstance("".join(ch.choices[0].text for ch in stream), str)
        body = json.loads(httpx.get(router.url + "/ready").text)
        assert body["ready"]
    finally:
        router.stop()
