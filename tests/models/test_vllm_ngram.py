"""Copy spans through vLLM's own n-gram speculation (issue #23 item 4): vLLM's CPU build
serving the reference transformer with ``--speculative-config`` ``ngram`` (prompt lookup)
and prefix caching, the hybrid in ``archroute serve-model``, and the span decoder over the
two engines.

Greedy answers are the in-process ones token for token (the transformer alone, and the
span decoder with ``copy-2`` model for model), and vLLM's spec-decode counters show that it
drafted and accepted tokens while serving them. Needs ``.venv-vllm`` (``scripts/vllm-env``);
skipped without it, as tests/models/test_vllm_engine.py (whose start-up it follows).
"""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest

from models.base import GenerationParams, TokenIds
from models.span.decoder import SpanBackend, SpanTrace
from models.span.remote import RemoteSpanBackend, RemoteTrace
from models.upstream import OpenAIUpstreamBackend
from tests.models.test_span_decoder import CODE
from tests.models.test_vllm_engine import (
    MODEL,
    MODEL_DIR,
    ROOT,
    START_TIMEOUT_S,
    VLLM,
    _stop,
    cpu_bind,
    skip_reason,
)
from tests.router.servers import Server, free_port

pytestmark = [pytest.mark.slow] + ([pytest.mark.skip(reason=skip_reason)] if skip_reason else [])

# what docs/span.md shows (#vllms-n-gram-speculation-for-copy-spans)
SPECULATIVE = ('{"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 4, '
               '"prompt_lookup_min": 2}')


@pytest.fixture(scope="module")
def ngram_engine(tmp_path_factory):
    """``vllm serve`` with n-gram speculation and prefix caching: its base URL."""
    tmp = tmp_path_factory.mktemp("vllm-ngram")
    port = free_port()
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu",
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", cpu_bind()),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [str(VLLM), "serve", str(MODEL_DIR), "--served-model-name", MODEL, "--host",
           "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
           "--max-num-seqs", "4", "--seed", "0", "--enable-prefix-caching",
           "--speculative-config", SPECULATIVE]
    log_path = tmp / "vllm.log"
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            if time.monotonic() - t0 > START_TIMEOUT_S:
                raise TimeoutError(f"vllm serve not healthy within {START_TIMEOUT_S:.0f} s:\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        yield url
    finally:
        _stop(proc)


def spec_counters(url: str) -> dict[str, float]:
    """vLLM's spec-decode counters (drafts, draft tokens, accepted tokens) from /metrics."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in ("vllm:spec_decode_num_draft_tokens_total",
                    "vllm:spec_decode_num_accepted_tokens_total"):
            out[name.split("num_")[1]] = out.get(name.split("num_")[1], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_the_transformer_alone_with_ngram_speculation_is_greedy_exact(ngram_engine,
                                                                       reference_pair) -> None:
    t = reference_pair[0]
    ids = t.prompt_ids(CODE)
    want = t.generate(TokenIds(tuple(ids)), GenerationParams(max_tokens=48, temperature=0.0,
                                                             ignore_eos=True))
    before = spec_counters(ngram_engine)
    up = OpenAIUpstreamBackend("v", ngram_engine + "/v1", MODEL, timeout=120)
    b = RemoteSpanBackend(up, OpenAIUpstreamBackend("h", ngram_engine + "/v1", MODEL),
                          t.tokenizer, "always-transformer", context_length=t.context_length)
    tr = RemoteTrace()
    got = b.generate(TokenIds(tuple(ids)), GenerationParams(max_tokens=48, temperature=0.0,
                                                            ignore_eos=True), trace=tr)
    assert got.text == want.text and len(tr.token_ids) == 48
    after = spec_counters(ngram_engine)
    drafted = after["draft_tokens_total"] - before.get("draft_tokens_total", 0.0)
    accepted = after["accepted_tokens_total"] - before.get("accepted_tokens_total", 0.0)
    assert drafted > 0 and 0 < accepted <= drafted  # the code repeats itself: drafts land


def test_span_decoding_over_vllm_ngram_and_serve_model(ngram_engine, reference_pair) -> None:
    """copy-2 over vLLM (the transformer, n-gram speculation) and serve-model (the hybrid:
    vLLM's CPU build cannot serve it): the in-process decoder's answer, model for model."""
    hybrid = Server(["serve-model", "reference:hybrid", "--name", "ref-h",
                     "--torch-threads", "1"]).wait_ready()
    try:
        t = reference_pair[0]
        b = RemoteSpanBackend(OpenAIUpstreamBackend("v", ngram_engine + "/v1", MODEL, timeout=120),
                              OpenAIUpstreamBackend("h", hybrid.url + "/v1", "ref-h", timeout=120),
                              t.tokenizer, "copy-2", context_length=t.context_length)
        params = GenerationParams(max_tokens=40, temperature=0.0)
        lt, rt = SpanTrace(), RemoteTrace()
        want = SpanBackend(reference_pair[0], reference_pair[1], "copy-2").generate(
            CODE, params, trace=lt)
        got = b.generate(CODE, params, trace=rt)
        assert got.text == want.text and rt.token_ids == lt.token_ids and rt.roles == lt.roles
        assert rt.switches >= 2
    finally:
        hybrid.stop()
