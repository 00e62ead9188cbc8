"""serve-model's prefix reuse through real processes on the shipped reference pair: a span
whose stream the client closed, then a request that extends what it kept, answers with the
tokens an in-process model gives without reuse, read from the engine's cache (``/ready``
counts it); span decoding over the two engines stops re-reading the sequence at every span;
concurrent conversations stay separate; the setting is read and checked like the others."""

from __future__ import annotations

import subprocess
import sys
import threading

import httpx
import openai
import pytest

from models.base import GenerationParams, TokenIds
from models.span.decoder import SpanBackend, SpanTrace
from models.span.remote import RemoteSpanBackend, RemoteTrace
from models.upstream import OpenAIUpstreamBackend
from tests.models.test_span_decoder import CODE, PROSE
from tests.router.servers import ROOT, Server, reference_available, reference_engines

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not reference_available(), reason="embedded reference pair not built yet")]


@pytest.fixture(scope="module")
def engines():
    with reference_engines() as (t, h):
        yield {"transformer": t, "hybrid": h}


def counters(srv: Server) -> dict[str, int]:
    return httpx.get(srv.url + "/ready").json()["prefix_cache"]


def stream_ids(srv: Server, model: str, ids: list[int], max_tokens: int,
               close_after: int | None = None) -> list[int]:
    """Greedy token ids streamed by ``srv`` for the token prompt ``ids`` (the official SDK);
    with ``close_after``, the client closes the stream after that many tokens."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    stream = client.completions.create(model=model, prompt=ids, max_tokens=max_tokens,
                                       temperature=0, stream=True, logprobs=1,
                                       extra_body={"return_tokens_as_token_ids": True,
                                                   "ignore_eos": True})
    out: list[int] = []
    with stream:
        for ev in stream:
            for ch in ev.choices:
                out += [int(t.split(":")[1]) for t in ((ch.logprobs and ch.logprobs.tokens) or [])]
            if close_after is not None and len(out) >= close_after:
                break
    return out


def local(b, ids: list[int], n: int) -> list[int]:
    return [t for c in b.stream(TokenIds(tuple(ids)), GenerationParams(
        max_tokens=n, temperature=0.0, ignore_eos=True)) for t in c.token_ids or ()]


@pytest.mark.parametrize("role", ["transformer", "hybrid"])
def test_a_closed_span_then_a_longer_prompt_is_read_from_the_cache(engines, reference_pair,
                                                                   role) -> None:
    srv, model = engines[role], {"transformer": "ref-t", "hybrid": "ref-h"}[role]
    b = reference_pair[0] if role == "transformer" else reference_pair[1]
    assert b.prefix_cache is None  # the in-process model decodes without reuse
    ids = b.prompt_ids(CODE)
    want = local(b, ids, 20)
    before = counters(srv)
    kept = stream_ids(srv, model, ids, 12, close_after=5)[:5]  # the engine may run ahead
    assert kept == want[:5]
    seq = ids + kept + want[5:9]  # 4 tokens "the other engine" produced
    got = stream_ids(srv, model, seq, 11)
    assert got == want[9:20]
    after = counters(srv)
    assert after["requests"] - before["requests"] == 2
    assert after["hits"] - before["hits"] == 1
    assert after["reused_tokens"] - before["reused_tokens"] >= len(ids) + 5
    # a prompt that shares only the start token with what the engine holds starts fresh
    other = b.prompt_ids(PROSE)
    assert stream_ids(srv, model, other, 6) == local(b, other, 6)
    assert counters(srv)["hits"] == after["hits"]


def test_span_decoding_over_the_engines_reads_each_token_once(engines, reference_pair) -> None:
    """The in-process decoder's answer, model for model; the engines now read from their
    caches what they had read at their last span."""
    t, h = engines["transformer"], engines["hybrid"]
    before = {r: counters(s) for r, s in engines.items()}
    rb = RemoteSpanBackend(OpenAIUpstreamBackend("t", t.url + "/v1", "ref-t", timeout=60),
                           OpenAIUpstreamBackend("h", h.url + "/v1", "ref-h", timeout=60),
                           reference_pair[0].tokenizer, "copy-2",
                           context_length=reference_pair[0].context_length)
    params = GenerationParams(max_tokens=40, temperature=0.0)
    lt, rt = SpanTrace(), RemoteTrace()
    want = SpanBackend(reference_pair[0], reference_pair[1], "copy-2").generate(CODE, params, trace=lt)
    got = rb.generate(CODE, params, trace=rt)
    assert got.text == want.text and rt.token_ids == lt.token_ids and rt.roles == lt.roles
    assert rt.switches >= 2
    after = {r: counters(s) for r, s in engines.items()}
    hits = sum(after[r]["hits"] - before[r]["hits"] for r in engines)
    reused = sum(after[r]["reused_tokens"] - before[r]["reused_tokens"] for r in engines)
    sent = sum(s.read for s in rt.spans)
    # every span after each engine's first resumes (a first may too: an earlier test left
    # an entry for this prompt); what is read again is at most the tokens the other engine
    # produced plus the run-ahead each engine rewinds
    assert hits >= len(rt.spans) - 2
    assert sent - reused <= 2 * len(lt.prompt_ids) + len(rt.token_ids) + 16 * len(rt.spans)


def test_concurrent_conversations_stay_apart(engines, reference_pair) -> None:
    t = engines["transformer"]
    b = reference_pair[0]
    prompts = [b.prompt_ids(p) for p in (CODE, PROSE, "The capital of France is",
                                         "import numpy as np\n")]
    want = {i: local(b, ids, 12) for i, ids in enumerate(prompts)}
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def talk(i: int) -> None:
        try:
            kept = stream_ids(t, "ref-t", prompts[i], 8, close_after=3)[:3]
            got[i] = kept + stream_ids(t, "ref-t", prompts[i] + kept, 9)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors and got == want


def test_the_setting_is_read_and_checked(tmp_path) -> None:
    def serve_model(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "router.cli", "serve-model", "fake",
                               "--print-settings"], cwd=ROOT, capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
                              timeout=60)

    import json

    r = serve_model({})
    assert json.loads(r.stdout)["model_server"]["prefix_cache"] == 4
    r = serve_model({"ARCHROUTE_MODEL_SERVER__PREFIX_CACHE": "0"})
    assert json.loads(r.stdout)["model_server"]["prefix_cache"] == 0
    r = serve_model({"ARCHROUTE_MODEL_SERVER__PREFIX_CACHE": "-1"})
    assert r.returncode == 2 and "prefix_cache" in r.stderr and "Traceback" not in r.stderr
