"""HFBackend on the shipped reference pair (the real files users get) and on a tiny
Llama-style checkpoint written in the test (any local causal-LM directory loads)."""

import numpy as np
import pytest
import torch

from models.base import ChatMessage, GenerationParams, RequestError
from models.hf import HFBackend, plain_chat_prompt

PROMPT = "def fibonacci(n):\n    "


def test_pair_loads_with_facts(reference_pair):
    t, h = reference_pair
    ti, hi = t.info(), h.info()
    assert (ti.architecture, hi.architecture) == ("transformer", "hybrid")
    assert 1_000_000 < ti.parameters < 5_000_000 and 1_000_000 < hi.parameters < 5_000_000
    assert "linear_attention" in hi.layer_types and "linear_attention" not in ti.layer_types
    assert t.tokenizer.get_vocab() == h.tokenizer.get_vocab()  # same tokenizer
    assert ti.context_length == hi.context_length == 1024
    assert t.cost_model() is not None and h.cost_model().recurrent_state_bytes() > 0


@pytest.mark.parametrize("arch", [0, 1])
def test_generation_is_deterministic_with_seed(reference_pair, arch):
    b = reference_pair[arch]
    p = GenerationParams(max_tokens=24, temperature=1.0, seed=7)
    a1, a2 = b.generate(PROMPT, p), b.generate(PROMPT, p)
    assert a1.text == a2.text and a1.completion_tokens == a2.completion_tokens > 0
    other = b.generate(PROMPT, GenerationParams(max_tokens=24, temperature=1.0, seed=8))
    greedy = b.generate(PROMPT, GenerationParams(max_tokens=24, temperature=0.0))
    assert len({a1.text, other.text, greedy.text}) > 1  # seeds and sampling matter


@pytest.mark.parametrize("arch", [0, 1])
def test_score_equals_full_forward_loss(reference_pair, arch):
    b = reference_pair[arch]
    prompt, cont = "import os\nimport sys\n", "def main(argv):\n    return 0\n"
    r = b.score(prompt, cont)
    ids = [b.prefix_id, *b.encode(prompt), *b.encode(cont)]
    n_cont = len(b.encode(cont))
    labels = torch.tensor([ids])
    labels[0, : len(ids) - n_cont] = -100  # loss on the continuation only
    with torch.no_grad():
        loss = b.model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
    assert len(r.logprobs) == n_cont == len(r.tokens)
    assert r.loss == pytest.approx(loss, abs=1e-4)


def test_batched_scoring_matches_single(reference_pair):
    _, h = reference_pair
    pairs = [("The cat", " sat on the mat."), ("x = [1, 2, 3", "]\nprint(x)"), ("", "Hello world")]
    batched = h.score_batch(pairs, batch_size=3)
    for (p, c), r in zip(pairs, batched, strict=True):
        single = h.score(p, c)
        np.testing.assert_allclose(r.logprobs, single.logprobs, atol=1e-4)


@pytest.mark.parametrize("arch", [0, 1])
def test_cached_generation_equals_no_cache_argmax(reference_pair, arch):
    b = reference_pair[arch]
    out = b.generate(PROMPT, GenerationParams(max_tokens=20, temperature=0.0))
    ids = [b.prefix_id, *b.encode(PROMPT)]
    gen: list[int] = []
    with torch.no_grad():
        for _ in range(20):
            logits = b.model(input_ids=torch.tensor([ids + gen]), use_cache=False).logits
            nxt = int(logits[0, -1].argmax())
            if nxt in b.eos_ids:
                break
            gen.append(nxt)
    assert out.text == b.tokenizer.decode(gen, skip_special_tokens=True)


def test_stream_concatenates_to_generate(reference_pair):
    t, _ = reference_pair
    p = GenerationParams(max_tokens=30, temperature=0.0)
    chunks = list(t.stream(PROMPT, p))
    assert chunks[-1].finish_reason in {"stop", "length"}
    assert "".join(c.text for c in chunks) == t.generate(PROMPT, p).text


def test_stop_sequences_cut_the_text(reference_pair):
    t, _ = reference_pair
    # ignore_eos: the chat-tuned pair may end a raw-text prompt at once
    full = t.generate(PROMPT, GenerationParams(max_tokens=30, temperature=0.0,
                                               ignore_eos=True)).text
    assert len(full) > 4
    stop = full[2:4]
    cut = t.generate(PROMPT, GenerationParams(max_tokens=30, temperature=0.0, stop=[stop],
                                              ignore_eos=True))
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


def test_context_overflow_is_a_client_error(reference_pair):
    t, _ = reference_pair
    with pytest.raises(RequestError, match="context length"):
        t.generate("word " * 2000, GenerationParams(max_tokens=8))


def test_chat_fallback_without_template(reference_pair):
    t, _ = reference_pair
    msgs = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
    assert t.render(msgs) == plain_chat_prompt(msgs) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert t.generate(msgs, GenerationParams(max_tokens=4, temperature=0)).completion_tokens >= 1


def test_any_local_causal_lm_directory(tmp_path, reference_pair):
    """A Llama-style checkpoint written here loads through the same code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = reference_pair[0].tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    b = HFBackend("llama-tiny", tmp_path)
    assert b.info().architecture == "transformer"
    assert b.generate("hello", GenerationParams(max_tokens=5, temperature=0)).completion_tokens <= 5
    assert len(b.score("hello", " world").logprobs) == len(b.encode(" world"))


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        HFBackend("nope", tmp_path)


def test_incremental_detokenizer_matches_full_decode(reference_pair):
    """Byte-level BPE splits multi-byte characters across tokens: pieces hold them back
    until whole, and the pieces concatenate to the full decode."""
    from models.hf import _IncrementalDetokenizer

    tok = reference_pair[0].tokenizer
    text = "naïve café — 数据 🙂 done(x)"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = _IncrementalDetokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == tok.decode(ids) == text
