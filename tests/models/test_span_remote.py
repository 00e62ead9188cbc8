"""Span decoding over two real engine processes (``archroute serve-model`` on the shipped
reference pair): greedy answers are token for token the in-process span decoder's; a switch
closes the old stream and opens one request on the other engine; token-id prompts and
token-id streams through serve-model; what cannot work is refused clearly (a router with
such a span profile does not start); a dead engine opens its own breaker, once."""

from __future__ import annotations

import httpx
import openai
import pytest

from models.base import GenerationParams, RequestError, TokenIds
from models.span.decoder import SpanBackend, SpanTrace
from models.span.remote import RemoteSpanBackend, RemoteSpanError, RemoteTrace
from models.upstream import OpenAIUpstreamBackend, UpstreamRequestError
from tests.models.test_span_decoder import CODE, PROSE
from tests.router.servers import Server, reference_available, reference_engines

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not reference_available(), reason="embedded reference pair not built yet")]


@pytest.fixture(scope="module")
def engines():
    with reference_engines() as pair:
        yield pair


def remote(engines, reference_pair, gate: str = "copy-2") -> RemoteSpanBackend:
    t, h = engines
    return RemoteSpanBackend(OpenAIUpstreamBackend("t", t.url + "/v1", "ref-t", timeout=60),
                             OpenAIUpstreamBackend("h", h.url + "/v1", "ref-h", timeout=60),
                             reference_pair[0].tokenizer, gate,
                             context_length=reference_pair[0].context_length)


@pytest.mark.parametrize("gate", ["copy-2", "copy-1+brackets"])
@pytest.mark.parametrize("prompt", [CODE, PROSE])
def test_greedy_answer_is_the_in_process_decoders(engines, reference_pair, gate, prompt) -> None:
    params = GenerationParams(max_tokens=40, temperature=0.0)
    local_tr, remote_tr = SpanTrace(), RemoteTrace()
    local = SpanBackend(*reference_pair, gate).generate(prompt, params, trace=local_tr)
    got = remote(engines, reference_pair, gate).generate(prompt, params, trace=remote_tr)
    assert remote_tr.token_ids == local_tr.token_ids
    assert remote_tr.roles == local_tr.roles
    assert got.text == local.text and got.finish_reason == local.finish_reason
    assert got.span is not None and got.span["switches"] == local_tr.switches
    # one request per run of one model: a switch opens exactly one new request; the chat-
    # tuned pair may end the answer right after a switch (the new span's engine says
    # end-of-sequence at once): that last request keeps no token and ends the answer
    spans = remote_tr.spans
    if spans[-1].kept == 0:
        assert got.finish_reason == "stop" and len(spans) > 1 and spans[-1].role != spans[-2].role
        spans = spans[:-1]
    assert all(s.kept > 0 for s in spans)
    assert len(spans) == remote_tr.switches + 1
    assert [s.role for s in spans] == [r for i, r in enumerate(remote_tr.roles)
                                       if i == 0 or r != remote_tr.roles[i - 1]]
    assert sum(s.kept for s in remote_tr.spans) == len(remote_tr.token_ids)
    if prompt is CODE and gate == "copy-2":
        assert remote_tr.switches >= 2  # the copy gate does hand the code back and forth


def test_stop_sequences_across_spans_and_seeded_sampling(engines, reference_pair) -> None:
    b = remote(engines, reference_pair)
    full = b.generate(CODE, GenerationParams(max_tokens=40, temperature=0.0))
    stop = full.text[10:14]
    cut = b.generate(CODE, GenerationParams(max_tokens=40, temperature=0.0, stop=[stop]))
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    p = GenerationParams(max_tokens=24, temperature=1.0, seed=7)
    assert b.generate(PROSE, p).text == b.generate(PROSE, p).text


def test_serve_model_reads_token_ids_and_streams_them(engines, reference_pair) -> None:
    t, _ = engines
    tb = reference_pair[0]
    ids = tb.prompt_ids("def add(a, b):")
    client = openai.OpenAI(base_url=t.url + "/v1", api_key="x")
    stream = client.completions.create(model="ref-t", prompt=ids, max_tokens=6, temperature=0,
                                       stream=True, logprobs=1,
                                       extra_body={"return_tokens_as_token_ids": True})
    toks, lps = [], []
    for ev in stream:
        for ch in ev.choices:
            if ch.logprobs and ch.logprobs.tokens:
                toks += [int(x.split(":")[1]) for x in ch.logprobs.tokens]
                lps += ch.logprobs.token_logprobs
    assert len(lps) == len(toks) and all(lp is not None and lp <= 0.0 for lp in lps)
    want = tb.generate(TokenIds(tuple(ids)), GenerationParams(max_tokens=6, temperature=0))
    assert tb.tokenizer.decode(toks) == want.text and len(toks) == want.completion_tokens
    # a text prompt gets the start token; the same ids as a token prompt give the same answer
    assert tb.generate("def add(a, b):", GenerationParams(max_tokens=6, temperature=0)).text == want.text
    # errors are the client's, with the reason
    for bad in ([10**9], []):
        r = httpx.post(t.url + "/v1/completions", json={"model": "ref-t", "prompt": bad})
        assert r.status_code == 400, r.text
    r = httpx.post(t.url + "/v1/completions", json={"model": "ref-t", "prompt": ids, "echo": True})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def test_what_cannot_work_is_refused(engines, reference_pair) -> None:
    with pytest.raises(RemoteSpanError, match="entropy"):
        remote(engines, reference_pair, "learned")
    with pytest.raises(RemoteSpanError, match="OpenAI-compatible"):
        RemoteSpanBackend(reference_pair[0], reference_pair[1],  # type: ignore[arg-type]
                          reference_pair[0].tokenizer, "copy-2")
    with pytest.raises(RequestError, match="context length"):
        remote(engines, reference_pair).generate("x " * 5000, GenerationParams(max_tokens=4))
    fake = Server(["serve-model", "fake", "--name", "f"]).wait_ready()
    try:
        b = RemoteSpanBackend(OpenAIUpstreamBackend("f", fake.url + "/v1", "f"),
                              OpenAIUpstreamBackend("f2", fake.url + "/v1", "f"),
                              reference_pair[0].tokenizer, "copy-2")
        with pytest.raises(UpstreamRequestError, match="token ids"):
            b.generate("hello", GenerationParams(max_tokens=4))
    finally:
        fake.stop()


def test_router_span_profile_over_two_engines(engines, reference_pair, tmp_path) -> None:
    """A real router process in front of the two engine processes: the span profile is
    served by the engines' span decoder (the answer the in-process decoder gives), its
    totals in the header and body. A span profile the engines cannot serve (an entropy
    gate; no tokenizer setting) stops the router at start, one line naming the setting."""
    from models.reference_pair import REFERENCE_DIR
    from tests.router.servers import serve_config
    from tests.router.test_span_router import serve_exit

    t, h = engines
    backends = {role: {"name": f"{role}-engine", "kind": "upstream", "base_url": srv.url + "/v1",
                       "model": model, "call_tools": False}
                for role, srv, model in (("transformer", t, "ref-t"), ("hybrid", h, "ref-h"))}
    backends["transformer"]["tokenizer"] = str(REFERENCE_DIR / "transformer")
    profiles = {"archroute-rules": {"policy": "rules"},
                "span-copy": {"policy": "span", "policy_args": {"gate": "copy-2"}}}
    router = serve_config({"backends": backends, "profiles": profiles,
                           "default_profile": "archroute-rules", "decision_log": None}, tmp_path)
    try:
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="x")
        raw = client.completions.with_raw_response.create(
            model="span-copy", prompt=CODE, max_tokens=24, temperature=0)
        r = raw.parse()
        span = r.model_extra["archroute"]["span"]
        # one request per run of one model, and one more when the answer ended right after
        # a switch (the new span's engine said end-of-sequence at once, keeping no token)
        ended_at_switch = r.choices[0].finish_reason == "stop"
        assert span["gate"] == "copy-2" and span["requests"] - span["switches"] - 1 in (
            (0, 1) if ended_at_switch else (0,))
        assert span["transformer"] + span["hybrid"] == r.usage.completion_tokens
        assert raw.headers["x-archroute-span"] == "; ".join(
            f"{k}={span[k]}" for k in ("transformer", "hybrid", "switches", "requests", "wasted",
                                       "gate"))
        local = SpanBackend(*reference_pair, "copy-2").generate(
            CODE, GenerationParams(max_tokens=24, temperature=0.0))
        assert r.choices[0].text == local.text
        text = "".join(c.choices[0].text for c in client.completions.create(
            model="span-copy", prompt=CODE, max_tokens=24, temperature=0, stream=True)
            if c.choices)
        assert text == local.text
        # the engines' own slots served every span: the span slot has no breaker of its own
        ready = httpx.get(router.url + "/ready").json()["backends"]
        assert ready["span-remote:copy-2"]["role"] == "span"
        assert {ready[f"{r}-engine"]["state"] for r in ("transformer", "hybrid")} == {"closed"}
    finally:
        router.stop()
    learned = {**profiles, "span-learned": {"policy": "span", "policy_args": {"gate": "learned"}}}
    rc, line = serve_exit({"backends": backends, "profiles": learned, "decision_log": None},
                          tmp_path)
    assert rc != 0 and "profiles.span-learned: cannot span-decode on this pair " \
        "(profiles.span-learned.policy_args.gate): " in line and "entropy" in line
    del backends["transformer"]["tokenizer"]
    rc, line = serve_exit({"backends": backends, "profiles": profiles, "decision_log": None},
                          tmp_path)
    assert rc != 0 and "profiles.span-copy: cannot span-decode on this pair " \
        "(backends.transformer.tokenizer): " in line
    # the built-in profiles on these engines without the tokenizer setting: archroute-span
    # (learned-topk over engines) is not served, archroute routes per request; the router
    # starts (with the tokenizer: test_archroute_over_two_engines_is_span_with_learned_topk)
    router = serve_config({"backends": backends, "decision_log": None}, tmp_path)
    try:
        r2 = httpx.post(router.url + "/v1/completions",
                        json={"model": "archroute-span", "prompt": CODE, "max_tokens": 4})
        assert r2.status_code == 404 and "tokenizer" in r2.json()["error"]["message"]
        alias = httpx.get(router.url + "/v1/models/archroute").json()
        assert (alias["alias_of"], alias["routing"]) == ("archroute-auto", "request")
    finally:
        router.stop()


def test_archroute_over_two_engines_is_span_with_learned_topk(engines, reference_pair,
                                                              tmp_path) -> None:
    """#23 item 5: a real router process over the two engine processes with the built-in
    profiles (no `profiles`, no `default_profile`) and the engines' tokenizer set: `archroute`
    is span routing with the gate trained for engines, learned-topk. The /v1/models card says
    so, and each decision (x-archroute-profile, x-archroute-span's gate); the answer through
    the openai SDK (chat, whole and streamed) is, greedy, token for token the engines' span
    decoder's with that gate."""
    from openai.types.chat import ChatCompletionMessageParam

    from models.base import ChatMessage
    from models.reference_pair import REFERENCE_DIR
    from tests.router.servers import serve_config

    t, h = engines
    backends = {role: {"name": f"{role}-engine", "kind": "upstream", "base_url": srv.url + "/v1",
                       "model": model, "call_tools": False}
                for role, srv, model in (("transformer", t, "ref-t"), ("hybrid", h, "ref-h"))}
    backends["transformer"]["tokenizer"] = str(REFERENCE_DIR / "transformer")
    router = serve_config({"backends": backends, "decision_log": None}, tmp_path)
    try:
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="x")
        cards = {m.id: m.model_extra or {} for m in client.models.list()}
        assert (cards["archroute"]["alias_of"], cards["archroute"]["routing"],
                cards["archroute"]["gate"]) == ("archroute-span", "span", "learned-topk")
        assert cards["archroute-span"]["gate"] == "learned-topk"
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": CODE}]
        raw = client.chat.completions.with_raw_response.create(
            model="archroute", messages=messages, max_tokens=24, temperature=0)
        r = raw.parse()
        assert (raw.headers["x-archroute-profile"], raw.headers["x-archroute-policy"]) == (
            "archroute-span", "span")
        head = dict(kv.split("=", 1) for kv in raw.headers["x-archroute-span"].split("; "))
        assert head["gate"] == "learned-topk"
        assert r.model_extra is not None and r.usage is not None
        span = r.model_extra["archroute"]["span"]
        assert span["gate"] == "learned-topk" and span["requests"] == span["switches"] + 1
        assert span["transformer"] + span["hybrid"] == r.usage.completion_tokens
        local = remote(engines, reference_pair, "learned-topk").generate(
            [ChatMessage("user", CODE)], GenerationParams(max_tokens=24, temperature=0.0))
        assert r.choices[0].message.content == local.text
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="archroute", messages=messages, max_tokens=24, temperature=0, stream=True)
            if c.choices)
        assert streamed == local.text
    finally:
        router.stop()
    assert ("model 'archroute' = profile archroute-span (span decoding, gate learned-topk"
            in (tmp_path / "router.log").read_text())


def test_a_dead_engine_opens_its_own_breaker_and_the_other_serves(engines, tmp_path) -> None:
    """A real router process over the transformer engine and a hybrid whose port refuses
    connections: a span request's call to the hybrid goes through the hybrid's own slot
    (its breaker opens, failure_threshold 1, shown under its name in /ready and /metrics);
    the request falls back to the transformer engine, which answers."""
    from models.reference_pair import REFERENCE_DIR
    from tests.router.servers import free_port, serve_config

    t, _ = engines
    backends = {"transformer": {"name": "transformer-engine", "kind": "upstream",
                                "base_url": t.url + "/v1", "model": "ref-t",
                                "call_tools": False,
                                "tokenizer": str(REFERENCE_DIR / "transformer")},
                "hybrid": {"name": "hybrid-engine", "kind": "upstream", "model": "ref-h",
                           "base_url": f"http://127.0.0.1:{free_port()}/v1",
                           "call_tools": False}}
    profiles = {"archroute-rules": {"policy": "rules"},
                "span-h": {"policy": "span", "policy_args": {"gate": "always-hybrid"}}}
    router = serve_config({"backends": backends, "profiles": profiles, "decision_log": None,
                           "failure_threshold": 1, "cooldown_s": 60}, tmp_path)
    try:
        r = httpx.post(router.url + "/v1/completions",
                       json={"model": "span-h", "prompt": CODE, "max_tokens": 6,
                             "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-archroute-backend"] == "transformer-engine"
        assert r.headers["x-archroute-fallback"].startswith("span-remote:always-hybrid; reason=")
        ready = httpx.get(router.url + "/ready").json()
        states = {name: v["state"] for name, v in ready["backends"].items()}
        assert states == {"transformer-engine": "closed", "hybrid-engine": "open",
                          "span-remote:always-hybrid": "open"} and ready["ready"]
        metrics = httpx.get(router.url + "/metrics").text
        assert 'archroute_breaker_open{backend="hybrid-engine"} 1.0' in metrics
        assert 'archroute_breaker_open{backend="transformer-engine"} 0.0' in metrics
    finally:
        router.stop()


def test_topk_entropy_is_a_lower_bound_that_tracks_the_entropy() -> None:
    """The proxy never exceeds the entropy, equals it when k covers the vocabulary, and the
    training path (evals.span.topk, from full logits) computes the same number."""
    import math

    import torch

    from models.span.decoder import entropy_nats
    from models.span.remote import topk_entropy

    gen = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 3.0, 10.0):
        logits = torch.randn(50, generator=gen) * scale
        lp = torch.log_softmax(logits, 0).tolist()
        h = entropy_nats(logits)
        assert topk_entropy(lp, 5) <= h + 1e-6
        assert topk_entropy(lp, 50) == pytest.approx(h, abs=1e-5)
        # more log-probabilities than k (an engine adds the sampled token): the k largest
        assert topk_entropy([*sorted(lp)[:3], *lp], 5) == pytest.approx(topk_entropy(lp, 5))
    assert topk_entropy([0.0], 5) == 0.0 and topk_entropy([math.log(0.5)] * 2, 5) == \
        pytest.approx(math.log(2))


def test_a_learned_gate_on_the_topk_proxy_runs_over_engines(engines, reference_pair,
                                                            tmp_path) -> None:
    """A learned gate whose artifact says it reads the top-5 proxy is accepted over engines;
    each span asks for logprobs: 5 (serve-model returns the 5 most likely and the chosen
    token), and the roles it chooses are the ones the same gate chooses teacher-forced on the
    answer with the proxies computed in-process from full logits (evals.span.topk)."""
    import numpy as np

    from evals.span.evaluate import rollout
    from evals.span.score import ScoredSeq
    from evals.span.topk import proxy_entropies
    from models.span.decoder import token_text_fn
    from models.span.learned import LearnedGate, load_learned_gate

    # a gate that hands copies to the transformer and reads the producer's proxy entropy
    LearnedGate({"bias": -0.3, "match_len": 0.6, "ent_last": -0.15, "last_t": 0.2},
                meta={"entropy": "topk:5"}).save(tmp_path)
    gate = load_learned_gate(tmp_path)
    b = remote(engines, reference_pair, gate)  # type: ignore[arg-type]
    assert b.topk == 5
    tr = RemoteTrace()
    b.generate(CODE, GenerationParams(max_tokens=40, temperature=0.0), trace=tr)
    assert tr.switches >= 2 and "transformer" in tr.roles and "hybrid" in tr.roles
    tok = reference_pair[0].tokenizer
    prompt = b.prompt_ids(CODE)
    n = len(tr.token_ids)
    seq = ScoredSeq("x", "t", "t", "t", np.asarray(prompt), np.asarray(tr.token_ids),
                    np.zeros((2, n), np.float32), np.zeros((2, n), np.float32))
    ent = np.stack([proxy_entropies(m, [seq])[0] for m in reference_pair])
    seq.ent = ent
    roles = rollout(gate, seq, token_text_fn(tok))
    assert [("transformer" if r else "hybrid") for r in roles] == tr.roles
    # serve-model's top-k: the 5 most likely tokens and the chosen one, as vLLM returns them
    t, _ = engines
    client = openai.OpenAI(base_url=t.url + "/v1", api_key="x")
    ev = next(e for e in client.completions.create(
        model="ref-t", prompt=prompt, max_tokens=1, temperature=1.0, seed=3, stream=True,
        logprobs=5, extra_body={"return_tokens_as_token_ids": True}) if e.choices[0].logprobs)
    lp = ev.choices[0].logprobs
    assert lp is not None and lp.top_logprobs and lp.tokens
    top = lp.top_logprobs[0]
    assert 5 <= len(top) <= 6 and lp.tokens[0] in top
    import torch

    with torch.no_grad():
        logits = reference_pair[0].model(input_ids=torch.tensor([prompt])).logits[0, -1]
    want = torch.topk(torch.log_softmax(logits.float(), 0), 5)
    got = sorted(top.items(), key=lambda kv: -kv[1])[:5]
    assert [int(k.split(":")[1]) for k, _ in got] == want.indices.tolist()
    assert [v for _, v in got] == pytest.approx(want.values.tolist(), abs=1e-4)


def test_a_router_serves_a_topk_gate_over_engines(engines, reference_pair, tmp_path) -> None:
    """A real router process: a span profile naming a learned gate trained on the top-k
    proxy (learned:PATH) starts over the two engines and answers; the shipped learned gate
    on the same engines stays a start-up error (test_router_span_profile_over_two_engines)."""
    from models.reference_pair import REFERENCE_DIR
    from models.span.learned import LearnedGate, load_learned_gate
    from tests.router.servers import serve_config

    gate_dir = tmp_path / "gate"
    LearnedGate({"bias": -0.3, "match_len": 0.6, "ent_last": -0.15, "last_t": 0.2},
                meta={"entropy": "topk:5"}).save(gate_dir)
    t, h = engines
    backends = {role: {"name": f"{role}-engine", "kind": "upstream", "base_url": srv.url + "/v1",
                       "model": model, "call_tools": False}
                for role, srv, model in (("transformer", t, "ref-t"), ("hybrid", h, "ref-h"))}
    backends["transformer"]["tokenizer"] = str(REFERENCE_DIR / "transformer")
    profiles = {"archroute-rules": {"policy": "rules"},
                "span-topk": {"policy": "span", "policy_args": {"gate": f"learned:{gate_dir}"}}}
    router = serve_config({"backends": backends, "profiles": profiles,
                           "default_profile": "archroute-rules", "decision_log": None}, tmp_path)
    try:
        r = httpx.post(router.url + "/v1/completions", json={
            "model": "span-topk", "prompt": CODE, "max_tokens": 24, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        span = r.json()["archroute"]["span"]
        assert span["gate"] == f"learned:{gate_dir}" and span["requests"] == span["switches"] + 1
        local = remote(engines, reference_pair, load_learned_gate(gate_dir)).generate(
            CODE, GenerationParams(max_tokens=24, temperature=0.0))
        assert r.json()["choices"][0]["text"] == local.text
    finally:
        router.stop()
