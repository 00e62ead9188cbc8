"""Prefix reuse on the shipped reference pair, in-process (models/prefix_cache.py): a stream
closed after a span, then a prompt that extends what it kept, decodes the tokens a fresh
generation decodes; the transformer resumes by cropping, the hybrid from a checkpoint; the
entries are bounded; what cannot be resumed starts fresh; a failed generation keeps
nothing. Through real serve-model processes: tests/router/test_model_server_prefix.py."""

from __future__ import annotations

import pytest

from models.base import GenerationParams, TokenIds
from models.hf import HFBackend
from models.prefix_cache import PrefixCache, cache_mode
from tests.models.test_span_decoder import CODE, PROSE
from tests.router.servers import reference_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not reference_available(), reason="embedded reference pair not built yet")]

GREEDY = GenerationParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def decode(b: HFBackend, ids: list[int], n: int = 16, close_after: int | None = None) -> list[int]:
    """Greedy token ids for the token prompt ``ids``; with ``close_after``, the stream is
    closed after that many tokens (a client that left: a span decoder that switched)."""
    out: list[int] = []
    gen = b.stream(TokenIds(tuple(ids)), GenerationParams(max_tokens=n, temperature=0.0,
                                                          ignore_eos=True))
    for chunk in gen:
        out += list(chunk.token_ids or ())
        if close_after is not None and len(out) >= close_after:
            gen.close()  # type: ignore[attr-defined]  # (HFBackend.stream is a generator)
            break
    return out


@pytest.fixture(params=["transformer", "hybrid"])
def model(request, reference_pair):
    b = reference_pair[0] if request.param == "transformer" else reference_pair[1]
    b.prefix_cache = None
    try:
        yield b
    finally:
        b.prefix_cache = None


@pytest.mark.parametrize("prompt", [CODE, PROSE])
@pytest.mark.parametrize("ahead", [0, 3])
def test_a_span_then_a_longer_prompt_decodes_as_without_reuse(model, prompt, ahead) -> None:
    """Request 1 keeps 5 tokens (the engine read ``ahead`` more before the stream closed);
    request 2 is the prompt, those 5 and 4 tokens "the other model" produced: it resumes
    from request 1's cache and reads only what it had not read, and every token is the one
    a fresh generation gives."""
    ids = model.prompt_ids(prompt)
    fresh = decode(model, ids, 24)
    model.prefix_cache = pc = PrefixCache(4)
    first = decode(model, ids, 24, close_after=5 + ahead)
    assert first == fresh[:5 + ahead]
    seq = ids + first[:5] + fresh[5:9]
    again = decode(model, seq)
    stats = pc.stats()
    model.prefix_cache = None
    assert again == decode(model, seq)
    assert stats["hits"] == 1 and stats["requests"] == 2
    # it read at most the tokens it had not read, plus the run-ahead it rewound
    assert stats["reused_tokens"] >= len(ids) + 4


def test_entries_are_bounded_and_unrelated_prompts_start_fresh(model) -> None:
    model.prefix_cache = pc = PrefixCache(2)
    prompts = [model.prompt_ids(p) for p in (CODE, PROSE, "The capital of France is")]
    for ids in prompts:
        decode(model, ids, 4)
    s = pc.stats()
    assert s["entries"] == 2 and s["hits"] == 0  # three entries stored, the oldest dropped
    # the start token alone is shared: not worth consuming another conversation's cache
    decode(model, [prompts[0][0], *model.encode("Another story begins")], 4)
    assert pc.stats()["hits"] == 0
    # that request's cache took the place of the oldest but one (PROSE; CODE went first):
    # the third prompt's continuation resumes, CODE's starts fresh
    decode(model, prompts[2] + [11], 4)
    assert pc.stats()["hits"] == 1
    decode(model, prompts[0] + [11], 4)
    assert pc.stats()["hits"] == 1 and pc.stats()["entries"] == 2


def test_the_hybrid_resumes_only_where_it_has_a_checkpoint(reference_pair) -> None:
    h = reference_pair[1]
    ids = h.prompt_ids(CODE)
    try:
        h.prefix_cache = pc = PrefixCache(4, checkpoints=2)
        got = decode(h, ids, 12, close_after=10)
        probe = decode(h, ids + got[:4] + [7], 2)  # 6 tokens back: no checkpoint there
        assert pc.stats()["hits"] == 0
        h.prefix_cache = None
        assert probe == decode(h, ids + got[:4] + [7], 2)
    finally:
        h.prefix_cache = None
    t = reference_pair[0]
    res = t.model(input_ids=__import__("torch").tensor([ids]), use_cache=True)
    assert cache_mode(getattr(res, "cache", None) or res.past_key_values) == "crop"


def test_a_failed_generation_keeps_nothing(model, monkeypatch) -> None:
    ids = model.prompt_ids(CODE)
    model.prefix_cache = pc = PrefixCache(4)
    decode(model, ids, 4)
    assert pc.stats()["entries"] == 1
    forward = model.model.forward

    def broken(*a, **k):
        forward(*a, **k)
        raise RuntimeError("device lost")

    monkeypatch.setattr(model.model, "forward", broken)
    with pytest.raises(Exception, match="device lost"):
        decode(model, ids + [11, 12], 4)
    monkeypatch.undo()
    assert pc.stats()["entries"] == 0  # the resumed entry was used up, the broken one dropped
    with pytest.raises(ValueError, match="entries"):
        PrefixCache(0)
