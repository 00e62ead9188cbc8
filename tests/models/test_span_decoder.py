"""The span decoder on the shipped reference pair: each token comes from the model the gate
chose, with the logits a full forward of that model gives on the same prefix (what the
teacher-forced evaluation assumes); catch-up through both caches; sampling, seeds, stop
sequences, max_tokens and streaming as for one backend; pairs that cannot share an answer
are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from models.base import GenerationParams, RequestError
from models.fake import FakeBackend
from models.hf import HFBackend
from models.span.decoder import (
    MAX_DRAFT_K,
    IncompatiblePairError,
    SpanBackend,
    SpanTrace,
    entropy_nats,
    gate_prompt_ids,
    induction_draft,
    mixture_logits,
    token_text_fn,
)
from models.span.gates import Gate, GateState, InductionMatcher, get_gate

# code that repeats itself: the copy gates hand spans to the transformer and back
CODE = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
        "fibonacci(n - 2)\n\nprint(fibonacci(10))\n\ndef fibonacci(")
PROSE = "Once upon a time, in a small village by the sea, there lived"


class EveryK(Gate):
    """A worst case for catch-up: the transformer for k tokens, then the hybrid for k, ..."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.name = f"every-{k}"

    def start(self, prompt_ids, token_text=None) -> GateState:
        k = self.k

        class S(GateState):
            def choose(self):
                return "transformer" if (self.step // k) % 2 == 0 else "hybrid"

        return S(prompt_ids, token_text)


def full_logits(backend: HFBackend, seq: list[int]) -> torch.Tensor:
    """Next-token logits after ``seq`` from one fresh forward, no cache."""
    with torch.no_grad():
        return backend.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float()


def check_against_full_forwards(span: SpanBackend, tr: SpanTrace) -> None:
    """Every step: the chosen model's logits equal a fresh forward of that model over the
    prompt and the answer so far; the token is their argmax; the entropy is theirs; and a
    replay of the gate over the final sequence makes the same choices."""
    by_role = {"transformer": span.transformer, "hybrid": span.hybrid}
    roles = tr.logit_roles
    assert roles[:len(tr.roles)] == tr.roles and len(tr.logits) == len(roles)
    assert len(roles) - len(tr.roles) in (0, 1)  # a final end-of-sequence step
    if not tr.draft_k and not any(tr.mixed):  # one forward per step
        assert len(tr.forwards) == len(roles)
        assert [f.role for f in tr.forwards] == roles
    elif not tr.draft_k:  # and one more on each mixed step: the other model's (not where
        # the transformer alone settled the mixture's greedy token)
        settled = sum(tr.settled[:len(tr.mixed)])
        assert len(tr.forwards) == len(roles) + sum(tr.mixed) - settled
    # the gate replayed over the final sequence makes the same choices and mixes; its
    # mixture weights (log-odds for the transformer) are the ones each mixed step must use
    state = span.gate.start(tr.prompt_ids, token_text_fn(span.transformer.tokenizer))
    mixed = tr.mixed or [False] * len(tr.token_ids)
    weights = []
    for tok, role, ent, mix in zip(tr.token_ids, tr.roles, tr.entropies, mixed, strict=True):
        assert state.choose() == role
        assert state.mix == mix
        weights.append(state.mix_lo)
        state.push(tok, role, ent)
    for i, (role, got) in enumerate(zip(roles, tr.logits, strict=True)):
        ref = full_logits(by_role[role], tr.prompt_ids + tr.token_ids[:i])
        ent = entropy_nats(ref)  # the chosen model's, also on a mixed step (the gate reads it)
        settled = bool(tr.settled and tr.settled[i])
        if i < len(tr.mixed) and tr.mixed[i]:  # both models' mixture, weighted by the gate
            other = span.hybrid if role == "transformer" else span.transformer
            lo = weights[i] if role == "transformer" else -weights[i]
            own = ref
            ref = mixture_logits(ref, full_logits(other, tr.prompt_ids + tr.token_ids[:i]), lo)
            if settled:  # the transformer's logits alone settled the mixture's argmax
                assert role == "transformer" and lo > 0
                assert float((got - own).abs().max()) < 1e-4, (i, role)
                got = ref
        else:
            assert not settled
        assert float((got - ref).abs().max()) < 1e-4, (i, role)
        if i < len(tr.token_ids):
            assert tr.token_ids[i] == int(ref.argmax())
            assert tr.entropies[i] == pytest.approx(ent, abs=1e-4)


@pytest.mark.parametrize("gate", ["copy-2", "copy-1+brackets", "learned"])
def test_greedy_tokens_are_the_chosen_models_with_full_forward_logits(reference_pair, gate):
    """The issue's bar, on code that repeats itself; the learned gate (when one ships) also
    reads the entropies, so its replay checks those too."""
    try:
        g = get_gate(gate)
    except Exception as exc:  # noqa: BLE001 - no trained gate in this checkout
        pytest.skip(f"gate {gate} does not load: {exc}")
    span = SpanBackend(*reference_pair, g)
    tr = SpanTrace(keep_logits=True)
    res = span.generate(CODE, GenerationParams(max_tokens=40, temperature=0.0), trace=tr)
    assert {"transformer", "hybrid"} <= set(tr.roles) and tr.switches >= 2  # both models ran
    check_against_full_forwards(span, tr)
    assert res.span == tr.summary()
    assert res.span["transformer"] + res.span["hybrid"] == res.completion_tokens
    assert tr.prompt_ids == gate_prompt_ids(span.transformer, CODE)
    assert res.text == span.transformer.tokenizer.decode(tr.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("k", [1, 3])
def test_catch_up_through_both_caches(reference_pair, k):
    """Forced switches every k tokens: the model taking over reads the other's k tokens in
    one forward (the hybrid its convolution and recurrent state, the transformer its KV
    cache), and that step and the decode steps after it give a full forward's logits. No
    position is read twice."""
    span = SpanBackend(*reference_pair, EveryK(k))
    tr = SpanTrace(keep_logits=True)
    res = span.generate(PROSE, GenerationParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                        trace=tr)  # ignore_eos: the chat-tuned pair may end a raw prompt early
    assert res.completion_tokens == 24 and res.finish_reason == "length"
    check_against_full_forwards(span, tr)
    n_prompt = len(tr.prompt_ids)
    assert tr.switches == 24 // k - 1
    for i, f in enumerate(tr.forwards):
        if i == 0:
            assert (f.tokens, f.prefill, f.catchup) == (n_prompt, n_prompt, 0)
        elif i == k:  # the hybrid's first turn: the prompt and the transformer's k tokens
            assert (f.tokens, f.prefill, f.catchup) == (n_prompt + k, n_prompt, k)
        elif i % k == 0:  # a take-over: its own last token and the other's k tokens
            assert (f.tokens, f.prefill, f.catchup) == (k + 1, 0, k)
        else:  # a decode step
            assert (f.tokens, f.catchup) == (1, 0)
    assert tr.catchup == 24 - k  # every run but the last is caught up once
    for role in ("transformer", "hybrid"):  # each model read each position at most once
        last = max(i for i, f in enumerate(tr.forwards) if f.role == role)
        assert sum(f.tokens for f in tr.forwards if f.role == role) == n_prompt + last


@pytest.mark.parametrize("gate, arch", [("always-transformer", 0), ("always-hybrid", 1)])
def test_one_model_gate_is_that_backend_sample_for_sample(reference_pair, gate, arch):
    """Same RNG semantics as HFBackend: with a gate that never switches, a seeded sampled
    answer is the single backend's, character for character; the other model never runs."""
    span = SpanBackend(*reference_pair, gate)
    for params in (GenerationParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=11),
                   GenerationParams(max_tokens=24, temperature=0.0, stop=["\n"])):
        tr = SpanTrace()
        got = span.generate(PROSE, params, trace=tr)
        want = reference_pair[arch].generate(PROSE, params)
        assert (got.text, got.completion_tokens, got.finish_reason) == (
            want.text, want.completion_tokens, want.finish_reason)
        assert {f.role for f in tr.forwards} == {gate.removeprefix("always-")}
        assert got.span["switches"] == got.span["catchup"] == 0


def test_seeds_and_sampling(reference_pair):
    span = SpanBackend(*reference_pair, "copy-1")
    p = GenerationParams(max_tokens=24, temperature=1.0, seed=3)
    a, b = span.generate(CODE, p), span.generate(CODE, p)
    assert a.text == b.text and a.span == b.span and a.completion_tokens > 0
    others = {span.generate(CODE, GenerationParams(max_tokens=24, temperature=1.0, seed=s)).text
              for s in (4, 5, 6)}
    assert len(others | {a.text}) > 1  # the seed matters
    greedy = span.generate(CODE, GenerationParams(max_tokens=24, temperature=0.0))
    assert greedy.text == span.generate(CODE, GenerationParams(max_tokens=24, temperature=0.0,
                                                               seed=99)).text


def test_stop_sequences_and_max_tokens(reference_pair):
    span = SpanBackend(*reference_pair, "copy-2")
    full = span.generate(CODE, GenerationParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    assert full.finish_reason == "length" and full.completion_tokens == 30 and len(full.text) > 6
    stop = full.text[4:6]
    cut = span.generate(CODE, GenerationParams(max_tokens=30, temperature=0.0, stop=[stop],
                                               ignore_eos=True))
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    assert cut.span["transformer"] + cut.span["hybrid"] == cut.completion_tokens < 30
    five = span.generate(CODE, GenerationParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert five.completion_tokens == 5 and full.text.startswith(five.text)


def test_max_tokens_none_runs_to_the_context_and_overflow_is_the_clients(reference_pair):
    span = SpanBackend(*reference_pair, "copy-2")
    word = span.transformer.encode(" the")
    assert len(word) == 1
    prompt = " the" * (span.context_length - 4)  # + the start token: room for 3 tokens
    res = span.generate(prompt, GenerationParams(max_tokens=None, temperature=0.0))
    assert res.prompt_tokens == span.context_length - 4
    assert res.completion_tokens <= 3 and (res.finish_reason == "stop" or res.completion_tokens == 3)
    with pytest.raises(RequestError, match="the smaller of"):
        span.generate(" the" * span.context_length, GenerationParams(max_tokens=4))


@pytest.mark.parametrize("stop", [[], ["fib"]])
def test_stream_concatenates_to_generate(reference_pair, stop):
    span = SpanBackend(*reference_pair, "copy-1")
    p = GenerationParams(max_tokens=30, temperature=0.0, stop=stop)
    chunks = list(span.stream(CODE, p))
    whole = span.generate(CODE, p)
    last = chunks[-1]
    assert "".join(c.text for c in chunks) == whole.text
    assert (last.finish_reason, last.completion_tokens, last.span) == (
        whole.finish_reason, whole.completion_tokens, whole.span)
    assert len(chunks) >= whole.completion_tokens  # one chunk per step, empty ones included
    for c in chunks[:-1]:
        assert (c.span_roles is not None) == bool(c.text)
        assert set(c.span_roles or ()) <= {"transformer", "hybrid"}
    roles_seen = {r for c in chunks for r in c.span_roles or ()}
    assert roles_seen == {r for r in ("transformer", "hybrid") if whole.span[r]}


def test_closing_the_stream_releases_both_models(reference_pair):
    t, h = reference_pair
    gen = SpanBackend(t, h, "copy-2").stream(CODE, GenerationParams(max_tokens=20))
    next(gen)
    assert t.forward_lock.locked() and h.forward_lock.locked()
    gen.close()
    assert not t.forward_lock.locked() and not h.forward_lock.locked()
    # the backend answers again (ignore_eos: an unseeded sample may be the end-of-sequence token)
    assert t.generate("x", GenerationParams(max_tokens=2, ignore_eos=True)).completion_tokens == 2


def test_scoring_is_refused(reference_pair):
    span = SpanBackend(*reference_pair)
    assert span.gate.name == "copy-2" and not span.can_score
    with pytest.raises(RequestError, match="scoring is not supported"):
        span.score("a", "b")
    info = span.info()
    assert info.context_length == 1024 and info.parameters == sum(
        b.info().parameters for b in reference_pair)


def test_pairs_that_cannot_share_an_answer_are_refused(reference_pair, tmp_path):
    t, h = reference_pair
    with pytest.raises(IncompatiblePairError, match="not in-process"):
        SpanBackend(t, FakeBackend("up", "hybrid"))
    with pytest.raises(IncompatiblePairError, match="same backend"):
        SpanBackend(t, t)
    other = copy.copy(h)  # the same model, but its start token is another id
    other.prefix_id = 5
    with pytest.raises(IncompatiblePairError, match=r"start tokens \(prefix_id\) differ"):
        SpanBackend(t, other)
    with pytest.raises(KeyError, match="unknown gate"):
        SpanBackend(t, h, "copy-9")


def test_a_different_tokenizer_is_refused(reference_pair, tmp_path):
    """A real second checkpoint whose tokenizer has one more token than the pair's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t, _ = reference_pair
    tok = copy.deepcopy(t.tokenizer)
    tok.add_tokens(["<extra_span_token>"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    llama = HFBackend("llama-tiny", tmp_path, architecture="hybrid")
    with pytest.raises(IncompatiblePairError,
                       match="vocabularies differ: reference-transformer has 4096 tokens, "
                             "llama-tiny 4097; 0 only in reference-transformer, 1 only in"):
        SpanBackend(t, llama)


def test_gate_registry_names_resolve(reference_pair):
    assert SpanBackend(*reference_pair, "copy-3+brackets").name == "span:copy-3+brackets"
    assert SpanBackend(*reference_pair, get_gate("brackets"), name="b").name == "b"


def test_span_and_single_requests_take_turns_on_the_models(reference_pair):
    """Span answers hold both models' locks (in one order), single-model answers one: run
    together from threads, none deadlocks and each answer is what it is alone."""
    from concurrent.futures import ThreadPoolExecutor

    t, h = reference_pair
    p = GenerationParams(max_tokens=12, temperature=0.0)
    jobs = [SpanBackend(t, h, "copy-1"), t, SpanBackend(t, h, EveryK(2)), h]
    alone = [b.generate(CODE, p).text for b in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: b.generate(CODE, p).text, jobs * 2))
    assert together == alone * 2


def test_ignore_eos_decodes_past_the_end_of_sequence(reference_pair):
    """``ignore_eos`` (vLLM's, for fixed-length benchmarks) in the single backend and the
    span decoder: with the greedy first token made an end-of-sequence token, the answer
    ends at once without it and runs to max_tokens with it."""
    t, h = (copy.copy(b) for b in reference_pair)
    first = t.generate(CODE, GenerationParams(max_tokens=1, temperature=0.0)).text
    eos = set(t.encode(first)[:1])
    t.eos_ids, h.eos_ids = t.eos_ids | eos, h.eos_ids | eos
    for b in (t, SpanBackend(t, h, "always-transformer")):
        stop = b.generate(CODE, GenerationParams(max_tokens=6, temperature=0.0))
        assert (stop.completion_tokens, stop.finish_reason) == (0, "stop")
        run = b.generate(CODE, GenerationParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        assert (run.completion_tokens, run.finish_reason) == (6, "length")


# ---- drafted copy spans -------------------------------------------------------------------
# a prompt the answer copies (the list to copy is in the prompt) and one it does not
COPY = ("Copy the list exactly.\nList: apples, pears, plums, cherries, figs, dates, limes, "
        "lemons, grapes, melons\nCopy: apples, pears, plums, cherries, figs, dates, limes, "
        "lemons, grapes, melons\nList: red, green, blue, cyan, magenta, yellow, black, white"
        "\nCopy:")
SHIPPED_GATES = ["copy-1", "copy-2", "copy-4", "copy-2+brackets", "brackets", "learned", "learned-topk",
                 "always-transformer", "always-hybrid"]


def _gate_or_skip(name: str) -> Gate:
    try:
        return get_gate(name)
    except Exception as exc:  # noqa: BLE001 - no trained gate in this checkout
        pytest.skip(f"gate {name} does not load: {exc}")


def test_induction_draft_follows_the_earlier_occurrence():
    m = InductionMatcher()
    m.extend([5, 6, 7, 8, 9, 5, 6])  # "5 6" occurred before, followed by 7 8 9 5 6
    assert induction_draft(m, 3, 2) == [7, 8, 9]
    assert induction_draft(m, 7, 2) == [7, 8, 9, 5, 6, 7, 8]  # past the end: periodic
    assert induction_draft(m, 3, 3) == []  # a match of 2 is too short for min_match 3
    assert induction_draft(m, 0, 1) == []
    m.push(1)  # no earlier 1
    assert induction_draft(m, 4, 1) == []
    m2 = InductionMatcher()
    m2.extend([3, 4, 3, 4])
    assert induction_draft(m2, 5, 2) == [3, 4, 3, 4, 3]


@pytest.mark.parametrize("gate", SHIPPED_GATES)
@pytest.mark.parametrize("prompt", [CODE, COPY, PROSE], ids=["code", "copy", "prose"])
def test_drafting_leaves_the_greedy_answer_token_for_token(reference_pair, gate, prompt):
    """The issue's bar: for every shipped gate, on prompts that copy and one that does not,
    the drafted decoder's greedy answer is the undrafted one's, token for token and model
    for model; where the transformer ran, drafts were verified and some accepted."""
    g = _gate_or_skip(gate)
    p = GenerationParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    plain, drafted = SpanTrace(), SpanTrace()
    want = SpanBackend(*reference_pair, g).generate(prompt, p, trace=plain)
    got = SpanBackend(*reference_pair, g, draft_k=6).generate(prompt, p, trace=drafted)
    assert (drafted.token_ids, drafted.roles) == (plain.token_ids, plain.roles)
    assert got.text == want.text and got.completion_tokens == 48
    assert drafted.entropies == pytest.approx(plain.entropies, abs=1e-4)
    assert {k: got.span[k] for k in want.span} == want.span
    assert got.span["drafted"] == drafted.drafted and got.span["accepted"] == drafted.accepted
    assert "drafted" not in want.span
    if prompt is not PROSE and gate not in ("always-hybrid", "brackets"):
        assert drafted.accepted > 0
        assert len(drafted.forwards) < len(plain.forwards)  # fewer forwards for the same answer
    if gate == "always-hybrid":
        assert drafted.drafted == 0  # only the transformer drafts


@pytest.mark.parametrize("gate", ["copy-2", "always-transformer", "learned"])
def test_drafted_logits_are_full_forwards_after_rollbacks(reference_pair, gate):
    """Every emitted token's logits (verify forwards included, after rejected drafts were
    cropped from the KV cache) equal a fresh forward over the prompt and the answer so far,
    and the gate replays to the same choices; the transformer's positions add up: it read
    each position once, drafts that were rejected aside."""
    span = SpanBackend(*reference_pair, _gate_or_skip(gate), draft_k=8)
    tr = SpanTrace(keep_logits=True)
    span.generate(CODE, GenerationParams(max_tokens=40, temperature=0.0), trace=tr)
    check_against_full_forwards(span, tr)
    assert tr.drafted > tr.accepted > 0  # drafts were rejected and rolled back
    assert all(f.accepted <= f.drafted <= 8 for f in tr.forwards)


def test_drafting_keeps_seeded_sampling_and_stops(reference_pair):
    """Sampling: one draw per token from the request's generator, accepted when it equals
    the draft (the speculative rule for a point-mass draft), so a seeded answer is the
    undrafted decoder's; stop sequences and max_tokens cut a drafted span where they cut
    an undrafted one; the stream concatenates to generate."""
    plain = SpanBackend(*reference_pair, "copy-1")
    drafted = SpanBackend(*reference_pair, "copy-1", draft_k=5)
    full = plain.generate(CODE, GenerationParams(max_tokens=30, temperature=0.0))
    for params in (GenerationParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=s)
                   for s in (1, 2, 3)):
        a, b = plain.generate(CODE, params), drafted.generate(CODE, params)
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
    stop = full.text[10:13]
    for p in (GenerationParams(max_tokens=30, temperature=0.0, stop=[stop]),
              GenerationParams(max_tokens=7, temperature=0.0)):
        a, b = plain.generate(CODE, p), drafted.generate(CODE, p)
        assert (a.text, a.completion_tokens, a.finish_reason) == (
            b.text, b.completion_tokens, b.finish_reason)
        chunks = list(drafted.stream(CODE, p))
        assert "".join(c.text for c in chunks) == b.text
        assert chunks[-1].span == b.span


def test_accepting_a_point_mass_draft_keeps_the_distribution():
    """The acceptance rule on its own: a draw from p accepted when it equals the draft d
    accepts with probability p(d) and, rejected, is distributed as p without d: the
    mixture is p itself (chi-square-free check on 20,000 draws, 4 outcomes)."""
    from models.hf import sample_next

    logits = torch.tensor([0.5, 1.5, -0.2, 0.9])
    p = torch.softmax(logits, 0)
    gen = torch.Generator().manual_seed(0)
    d, n = 1, 20_000
    draws = [sample_next(logits, 1.0, 1.0, gen) for _ in range(n)]
    accepted = sum(x == d for x in draws) / n
    assert accepted == pytest.approx(float(p[d]), abs=0.015)
    rejected = torch.bincount(torch.tensor([x for x in draws if x != d]), minlength=4).float()
    want = p.clone()
    want[d] = 0
    assert torch.allclose(rejected / rejected.sum(), want / want.sum(), atol=0.015)


@pytest.mark.parametrize("kw", [{"draft_k": -1}, {"draft_k": MAX_DRAFT_K + 1},
                                {"draft_k": True}, {"draft_k": 2.5},
                                {"draft_min_match": 0}, {"draft_min_match": 9}])
def test_draft_settings_out_of_range_are_refused(reference_pair, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SpanBackend(*reference_pair, "copy-2", **kw)


@pytest.mark.parametrize("gate", ["learned+copy-8-prompt-2+mix-1", "learned+mix-2",
                                  "learned+copy-8-prompt-2+mix-2-tilt-1.5",
                                  "learned+copy-8-prompt-2+mix-2-tilt-1.5-lock-2"])
@pytest.mark.parametrize("draft_k", [0, 8])
@pytest.mark.parametrize("prompt", [CODE, COPY, PROSE], ids=["code", "copy", "prose"])
def test_mixed_tokens_are_both_models_mixture_and_drafting_keeps_them(reference_pair, prompt,
                                                                     draft_k, gate):
    """A mixing gate (+mix-M): where the gate is unsure, the token is the argmax of both
    models' 50/50 mixture, each model's logits equal to a fresh forward; elsewhere the
    chosen model's; the gate replays to the same choices and mixes; drafting changes no
    token, role or mix (a mixed step right after accepted drafts re-reads the last one);
    the totals count the mixed tokens."""
    g = _gate_or_skip(gate)
    span = SpanBackend(*reference_pair, g, draft_k=draft_k)
    tr = SpanTrace(keep_logits=True)
    p = GenerationParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    res = span.generate(prompt, p, trace=tr)
    assert len(tr.mixed) == len(tr.token_ids) == 40
    assert any(tr.mixed)
    if gate.endswith("mix-1") and prompt is not PROSE:  # locked copies are never mixed
        assert not all(tr.mixed)
    check_against_full_forwards(span, tr)
    assert res.span["mixed"] == sum(tr.mixed)
    if gate.endswith("lock-2") and prompt is COPY:  # a locked copy: the hybrid rarely asked
        assert sum(tr.settled) > 10
        assert sum(f.role == "hybrid" for f in tr.forwards) < sum(tr.mixed) - 10
    plain = SpanTrace()
    SpanBackend(*reference_pair, g).generate(prompt, p, trace=plain)
    assert (tr.token_ids, tr.roles, tr.mixed) == (plain.token_ids, plain.roles, plain.mixed)


def test_mix_gate_mixes_only_unsure_choices_and_never_a_locked_copy():
    class Scored(Gate):
        name = "scored"

        def start(self, prompt_ids, token_text=None) -> GateState:
            class S(GateState):
                def choose(self):
                    self.margin = [0.1, 2.0, 0.3][self.step % 3]
                    return "hybrid"

            return S(prompt_ids, token_text)

    from models.span.gates import CopyLockGate, MixGate

    state = MixGate(Scored(), 0.5).start([1, 2, 3])
    got = []
    for tok in (7, 8, 9):
        state.choose()
        got.append(state.mix)
        state.push(tok, "hybrid", 1.0)
    assert got == [True, False, True]
    # a copy under way (the prompt's "1 2" repeated) is locked: sure, never mixed
    locked = MixGate(CopyLockGate(Scored(), 8, prompt=2), 0.5).start([1, 2, 3, 4])
    for tok in (1, 2):
        locked.choose()
        locked.push(tok, "hybrid", 1.0)
    assert locked.choose() == "transformer" and not locked.mix
    # prompt=1: no mixing where the last token repeats the prompt (a copy may be starting)
    for pk, want in ((1, [True, False, True, False]), (None, [True, False, True, True])):
        quiet = MixGate(Scored(), 0.5, prompt=pk).start([1, 2, 3])
        got = []
        for tok in (9, 9, 2, 5):  # the last choice follows 2, a prompt token
            quiet.choose()
            got.append(quiet.mix)
            quiet.push(tok, "hybrid", 1.0)
        assert got == want, pk
    assert get_gate("copy-2+mix-1-prompt-1").name == "copy-2+mix-1-prompt-1"
    assert get_gate("copy-2+mix-1").start([1, 2]).choose() in ("transformer", "hybrid")
    for bad in (0, -1, 11, "x"):
        with pytest.raises(ValueError):
            MixGate(Scored(), bad)
    with pytest.raises(ValueError):
        MixGate(Scored(), 1.0, prompt=0)
    # tilt B: the transformer's weight in the mixture is sigmoid(B * s), s the score's signed
    # distance from the boundary (the hybrid chosen here: s = -margin); 0 where not mixed
    tilted = MixGate(Scored(), 0.5, tilt=1.5).start([1, 2, 3])
    got = []
    for tok in (7, 8, 9):
        tilted.choose()
        got.append(tilted.mix_lo)
        tilted.push(tok, "hybrid", 1.0)
    assert got == pytest.approx([-0.15, 0.0, -0.45])
    assert MixGate(Scored(), 0.5).start([1]).mix_lo == 0.0
    g = get_gate("copy-2+mix-1-prompt-1-tilt-1.5")
    assert isinstance(g, MixGate) and (g.prompt, g.tilt) == (1, 1.5)
    assert g.name == "copy-2+mix-1-prompt-1-tilt-1.5"
    for bad in (-0.5, 10.5, "x"):
        with pytest.raises(ValueError):
            MixGate(Scored(), 1.0, tilt=bad)
    with pytest.raises(ValueError, match="tilt"):
        get_gate("copy-2+mix-1-tilt-11")
    # repeat=K: no mixing where the last K tokens occurred before, in the prompt or the answer
    for rk, want in ((2, [True, True, True, False]), (None, [True, True, True, True])):
        rep = MixGate(Scored(), 5.0, repeat=rk).start([1, 2, 3])
        got = []
        for tok in (7, 1, 2, 5):  # the last choice follows "1 2", the prompt's first tokens
            rep.choose()
            got.append(rep.mix)
            rep.push(tok, "hybrid", 1.0)
        assert got == want, rk
    g = get_gate("copy-2+mix-2-repeat-4-tilt-1.5")
    assert isinstance(g, MixGate) and (g.repeat, g.tilt, g.prompt) == (4, 1.5, None)
    assert g.name == "copy-2+mix-2-repeat-4-tilt-1.5"
    for bad in (0, 9):
        with pytest.raises(ValueError, match="repeat"):
            MixGate(Scored(), 1.0, repeat=bad)
    # lock=L: a locked copy's token is mixed too, leaning on the transformer by log-odds L
    for lk, want in ((2.0, (True, 2.0)), (None, (False, 0.0))):
        lm = MixGate(CopyLockGate(Scored(), 8, prompt=2), 0.5, lock=lk).start([1, 2, 3, 4])
        for tok in (1, 2):
            lm.choose()
            lm.push(tok, "hybrid", 1.0)
        assert lm.choose() == "transformer" and lm.locked and (lm.mix, lm.mix_lo) == want
    g = get_gate("copy-2+mix-2-tilt-1.5-lock-2")
    assert isinstance(g, MixGate) and (g.tilt, g.lock) == (1.5, 2.0)
    assert g.name == "copy-2+mix-2-tilt-1.5-lock-2"
    for bad in (0, -1, 11):
        with pytest.raises(ValueError, match="lock"):
            MixGate(Scored(), 1.0, lock=bad)


def test_the_transformer_alone_settles_a_leaning_mixtures_greedy_token_only_when_it_must():
    """lean_token's bound: whenever it names a token, that token is the mixture's argmax for
    any hybrid distribution (random and adversarial ones: all the hybrid's mass on the
    transformer's runner-up); it names none for a mixture not leaning on the transformer."""
    from models.span.decoder import lean_token

    g = torch.Generator().manual_seed(0)
    named = 0
    for trial in range(300):
        t = torch.randn(50, generator=g) * (1 + trial % 7)
        lo = float(torch.rand(1, generator=g)) * 4 - 1
        x = lean_token(t, lo)
        if lo <= 0:
            assert x is None
        if x is None:
            continue
        named += 1
        second = int(torch.topk(t, 2).indices[1])
        for h in (torch.randn(50, generator=g) * 5, torch.full((50,), -1e4).index_fill_(
                0, torch.tensor([second]), 0.0)):
            assert int(mixture_logits(t, h, lo).argmax()) == x
    assert named > 30
