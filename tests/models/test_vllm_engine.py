"""A real engine: vLLM's CPU build serving the shipped reference transformer, with
ArchRoute's upstream backend (and a real ``archroute serve``) in front of it.

Needs ``.venv-vllm`` (``scripts/vllm-env``, run by ``./dev vllm``); skipped without it.
Results and tested versions: docs/router.md, "Tested engines".

Apples to apples. The reference tokenizer adds no start token and vLLM sends the text as
the tokenizer encodes it, while the in-process backend puts ``prefix_id`` (the start
token, ``<|endoftext|>``, id 0) before every prompt. So every prompt sent to vLLM starts
with that token's text, which vLLM's tokenizer turns into id 0 (a special token in the
text); the chat template given to vLLM does the same (``{{ bos_token }}``) and renders
messages as the in-process fallback does (``models.hf.plain_chat_prompt``). And vLLM
tokenizes prompt + continuation as one text, while the in-process ``score`` tokenizes them
apart: the pairs below tokenize the same either way (asserted), and one pair that does not
is compared as one whole text instead.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from models.base import ChatMessage, GenerationParams
from models.upstream import OpenAIUpstreamBackend
from tests.router.servers import Server, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / os.environ.get("ARCHROUTE_VLLM_VENV", ".venv-vllm")
VLLM = VENV / "bin" / "vllm"
MODEL_DIR = ROOT / "models" / "reference" / "transformer"
MODEL = "reference-transformer"
START_TIMEOUT_S = float(os.environ.get("ARCHROUTE_VLLM_START_TIMEOUT", "420"))
TOL = 1e-3  # nats per token

# models.hf.plain_chat_prompt, after the start token. The newlines are string literals:
# chat templates render with trim_blocks, which drops a newline right after a block tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ m['role'] | capitalize }}: {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)

PROMPTS = ["The cat sat on the", "Once upon a time", "def add(a, b):"]
PAIRS = [  # tokenize the same apart and joined (asserted)
    ("The cat sat on the", " mat."),
    ("Once upon a time", " there was a little girl who lived in a village."),
    ("Paris is the capital of", " France, and Berlin is the capital of Germany."),
    ("import numpy as np\n", "x = np.zeros(3)\nprint(x)"),
]
MERGING = ("def add(a, b):\n", "    return a + b\n")  # "\n" + "   " join into one token
GREEDY = GenerationParams(max_tokens=24, temperature=0.0)

skip_reason = None
if not VLLM.exists():
    skip_reason = f"no vLLM environment at {VENV.name}/ (create it with scripts/vllm-env, or run ./dev vllm)"
elif not (MODEL_DIR / "config.json").exists():
    skip_reason = "the reference transformer is not shipped in this checkout"
if skip_reason:
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=skip_reason)]


def cpu_bind() -> str:
    """VLLM_CPU_OMP_THREADS_BIND for the cores this process may use ('all' is rejected)."""
    cores = sorted(os.sched_getaffinity(0))
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to vLLM's process group (API server, engine core, worker), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:  # whatever of the group is left (a worker outliving its parent)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """``vllm serve`` on a free loopback port: (base URL without /v1, start-up seconds)."""
    tmp = tmp_path_factory.mktemp("vllm")
    (tmp / "chat.jinja").write_text(CHAT_TEMPLATE)
    port = free_port()
    env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",  # (a) the CPU platform
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", cpu_bind()),  # (b)
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
    }
    env.pop("PYTHONPATH", None)  # the engine's own environment only
    cmd = [str(VLLM), "serve", str(MODEL_DIR), "--served-model-name", MODEL,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--max-num-seqs", "4", "--seed", "0",
           "--chat-template", str(tmp / "chat.jinja")]
    log_path = tmp / "vllm.log"
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: stopped whole
    try:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{tail}")
            if time.monotonic() - t0 > START_TIMEOUT_S:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise TimeoutError(f"vllm serve not healthy within {START_TIMEOUT_S:.0f} s:\n{tail}")
            try:
                if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        startup = time.monotonic() - t0
        print(f"\nvllm serve healthy after {startup:.0f} s (log: {log_path})")
        yield url, startup
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def hf():
    from models.reference_pair import load_reference

    return load_reference("transformer")


@pytest.fixture(scope="module")
def bos(hf) -> str:
    return hf.tokenizer.convert_ids_to_tokens(hf.prefix_id)


@pytest.fixture
def up(engine):
    backend = OpenAIUpstreamBackend(MODEL, engine[0] + "/v1", MODEL, timeout=120.0)
    yield backend
    backend.close()


def test_engine_serves_the_model(engine, hf, bos) -> None:
    url, startup = engine
    version = httpx.get(url + "/version", timeout=10).json().get("version")
    models = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
    print(f"vLLM {version}, start-up {startup:.0f} s, models {models}")
    assert models == [MODEL]
    assert bos == "<|endoftext|>" and hf.prefix_id == 0
    assert hf.tokenizer(bos + "The cat")["input_ids"][0] == hf.prefix_id  # as vLLM encodes it


def test_generate_matches_in_process(up, hf, bos) -> None:
    for prompt in PROMPTS:
        ours = hf.generate(prompt, GREEDY)
        theirs = up.generate(bos + prompt, GREEDY)
        assert theirs.text == ours.text, prompt
        assert theirs.completion_tokens == ours.completion_tokens
        assert theirs.prompt_tokens == ours.prompt_tokens + 1  # vLLM counts the start token
        assert theirs.finish_reason == ours.finish_reason


def test_stream_matches_generate(up, hf, bos) -> None:
    for prompt in PROMPTS[:2]:
        chunks = list(up.stream(bos + prompt, GREEDY))
        assert "".join(c.text for c in chunks) == hf.generate(prompt, GREEDY).text
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].completion_tokens == GREEDY.max_tokens


def test_async_paths(up, hf, bos) -> None:
    """agenerate / astream / ascore: the aiohttp path the router itself uses."""
    prompt = PROMPTS[0]
    expected = hf.generate(prompt, GREEDY).text
    pair = PAIRS[0]

    async def go():
        try:
            gen = await up.agenerate(bos + prompt, GREEDY)
            streamed = "".join([c.text async for c in up.astream(bos + prompt, GREEDY)])
            scored = await up.ascore(bos + pair[0], pair[1])
            return gen, streamed, scored
        finally:
            await up.aclose()

    gen, streamed, scored = asyncio.run(go())
    assert gen.text == expected
    assert streamed == expected
    ours = hf.score(*pair).logprobs
    assert max(abs(a - b) for a, b in zip(scored.logprobs, ours, strict=True)) < TOL


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_score_matches_in_process(up, hf, bos) -> None:
    diffs = []
    for prompt, cont in PAIRS:
        assert hf.encode(prompt + cont) == hf.encode(prompt) + hf.encode(cont), (prompt, cont)
        ours = hf.score(prompt, cont)
        theirs = up.score(bos + prompt, cont)
        assert theirs.tokens == [hf.tokenizer.convert_tokens_to_string([t]) for t in ours.tokens]
        diffs.append(_max_diff(theirs.logprobs, ours.logprobs))
    print(f"score: max |vLLM - in-process| per token, by pair: {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) < TOL


def test_score_of_a_whole_text(up, hf, bos) -> None:
    """Where prompt and continuation merge into one token, compare the whole text's
    tokens (as vLLM tokenizes it) after the start token."""
    text = "".join(MERGING)
    assert hf.encode(text) != hf.encode(MERGING[0]) + hf.encode(MERGING[1])
    ours = hf.score("", text)
    theirs = up.score(bos, text)
    diff = _max_diff(theirs.logprobs, ours.logprobs)
    print(f"score, whole text: max diff {diff:.1e} over {len(ours.logprobs)} tokens")
    assert diff < TOL


def test_without_the_start_token_scores_differ(up, hf) -> None:
    """Why every prompt above starts with the start token's text: without it vLLM scores
    another input (no id 0 first), and the numbers differ by far more than the tolerance."""
    prompt, cont = PAIRS[0]
    assert _max_diff(up.score(prompt, cont).logprobs, hf.score(prompt, cont).logprobs) > 10 * TOL


def test_router_in_front_of_vllm(engine, hf, tmp_path) -> None:
    """A real ``archroute serve`` with vLLM as its transformer backend."""
    url, _ = engine
    router = Server(["serve", "--transformer", f"{url}/v1#{MODEL}", "--hybrid", "fake",
                     "--decision-log", ""], log_path=tmp_path / "router.log")
    try:
        router.wait_ready()
        messages = [{"role": "system", "content": "You are brief."},
                    {"role": "user", "content": "Write one sentence about the sea."}]
        chat = [ChatMessage(**m) for m in messages]
        rendered = hf.tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE,
                                                    tokenize=False, add_generation_prompt=True)
        assert rendered == hf.tokenizer.bos_token + hf.render(chat)  # the same prompt text
        resp = httpx.post(router.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["archroute"]["backend"] == MODEL
        assert resp.headers["x-archroute-backend"] == MODEL
        expected = hf.generate(chat, GenerationParams(max_tokens=16, temperature=0.0))
        assert body["choices"][0]["message"]["content"] == expected.text
        # the chat-tuned pair answers briefly and may end before max_tokens: the same end
        assert body["choices"][0]["finish_reason"] == expected.finish_reason
        # vLLM's usage counts the end-of-sequence token it generated; ours does not
        assert body["usage"]["completion_tokens"] == expected.completion_tokens + (
            expected.finish_reason == "stop")
    finally:
        router.stop()
