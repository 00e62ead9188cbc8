"""The span decoder: one answer from two models that share a tokenizer, a gate choosing per
token which model predicts the next one (:mod:`models.span.gates`).

Each step ``role = state.choose()`` names the model; only that model runs. A model that was
not chosen for a while is *behind*: its cache ends before the tokens the other model produced
meanwhile. When it is chosen again it reads all of them in one batched forward (the
transformer's KV cache grows by that many positions; the hybrid's convolution state and
Gated DeltaNet recurrent state continue through the chunked kernel from where they were),
and its last position's logits predict the next token. No model ever reads a position twice,
and each token is predicted by exactly one model: the one the gate chose.

**The prompt is prefilled lazily.** Only the model the gate chooses first reads the prompt
before the first token; the other reads it at its first take-over, together with the answer
tokens it skipped, in the same forward. Prefilling both at the start would put a second
prefill before the first token for nothing when the gate never switches (``always-*``
gates, short answers, a copy gate on prose), and when it does switch the work is the same
prompt prefill, only later and batched with the catch-up. What it costs: the first switch
pays for the prompt too (a latency bump mid-answer, the size of a prefill).

**The gate sees** ``[start token, *prompt tokens]`` (:func:`gate_prompt_ids`, the ids the
models read before the answer), then each answer token with the role that produced it and
the entropy (nats, :func:`entropy_nats`) of that model's next-token distribution at
temperature 1, whatever the sampling temperature: the teacher-forced evaluation computes the
same quantities from full forwards, so the gate makes the same choices in both.

**Drafted copy spans** (``draft_k`` > 0). When the gate hands the transformer the next token
and the induction match (the gate's own :class:`~models.span.gates.InductionMatcher`, the
last ``draft_min_match`` or more tokens seen earlier) predicts a continuation, up to
``draft_k`` tokens of it are drafted (prompt lookup, n-gram drafting: the tokens that followed
the earlier occurrence) and the transformer reads them in the same forward as its pending
tokens, so one forward gives its logits at every drafted position (its KV cache grows by the
draft; :meth:`_Cursor.keep` crops the rejected positions). Position by position the token is
then sampled from those logits exactly as without drafting, the gate is pushed the token with
that position's entropy and asked for the next position: the draft goes on while the token
equals the drafted one **and** the gate keeps the transformer. So the gate decides every
position and greedy output is token for token the undrafted decoder's (tested for every
shipped gate); the hybrid catches up on the accepted tokens in one batched forward when next
chosen, as on any transformer span. With temperature > 0 a token is one draw from the
transformer's (temperature, top-p) distribution p, accepted when it equals the draft d: that
is the speculative sampling rule for a point-mass draft (accept d with probability
min(1, p(d)/1) = p(d); on rejection a draw from p with d's mass removed, renormalised), so
the output distribution is unchanged, and since each position takes exactly one draw from
the request's generator, a seeded answer is the undrafted decoder's too. The transformer
alone (a single :class:`~models.hf.HFBackend`) never drafts: it is the baseline.

Sampling, seeds (one ``torch.Generator`` seeded from ``params.seed``), stop sequences,
``max_tokens`` (None: up to the context, the smaller of the two) and streaming (one chunk per
step, empty while text is held back) are :class:`models.hf.HFBackend`'s, through the same
helpers (:func:`models.hf.sample_next`, :class:`models.hf.StreamText`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.base import (
    Backend,
    BackendError,
    BackendInfo,
    GenerationParams,
    GenerationResult,
    Prompt,
    RequestError,
    ScoreResult,
    StreamChunk,
)
from models.hf import HFBackend, StreamText, sample_next
from models.span.gates import MAX_MATCH, Gate, GateState, InductionMatcher, Role, get_gate

log = logging.getLogger(__name__)

ROLES: tuple[Role, Role] = ("transformer", "hybrid")
DEFAULT_GATE = "copy-2"  # when no trained gate ships (see default_gate_name)
DEFAULT_GATE_DIR = Path(__file__).resolve().parent / "default_gate"
# drafted copy spans (SpanBackend(draft_k=...)): the most tokens one verify forward checks,
# and the induction match (tokens) a draft needs; the router's defaults are in
# router/settings.py (measured: docs/span.md)
MAX_DRAFT_K = 32
DEFAULT_DRAFT_MIN_MATCH = 2
# text both tokenizers must split identically (catches a normalizer or pre-tokenizer that
# differs while the vocabularies are equal)
PROBE = "Hello, World!  x = [1, {'a': (2)}]\n\tdef f():\n    return \"ünïcödé\" — 数据 🙂 42."


class IncompatiblePairError(ValueError):
    """The two backends cannot share one answer: not both in-process, or their tokenizers
    differ. Raised when a :class:`SpanBackend` is built; the message names what differs."""


def pair_mismatch(transformer: Backend, hybrid: Backend) -> str | None:
    """Why these two backends cannot be span-decoded together, or None when they can."""
    for role, b in (("transformer", transformer), ("hybrid", hybrid)):
        if not isinstance(b, HFBackend):
            return (f"the {role} backend {b.name!r} is not in-process ({type(b).__name__}); "
                    "span decoding hands the answer between two models' caches token by "
                    "token, which needs both loaded here (HFBackend)")
    assert isinstance(transformer, HFBackend) and isinstance(hybrid, HFBackend)
    if transformer is hybrid:
        return "the transformer and the hybrid are the same backend"
    t, h = transformer, hybrid
    ta, ha = t.tokenizer, h.tokenizer
    va, vb = ta.get_vocab(), ha.get_vocab()
    if va != vb:
        moved = sum(1 for k in va.keys() & vb.keys() if va[k] != vb[k])
        return (f"the vocabularies differ: {t.name} has {len(va)} tokens, {h.name} {len(vb)}; "
                f"{len(va.keys() - vb.keys())} only in {t.name}, {len(vb.keys() - va.keys())} "
                f"only in {h.name}, {moved} with different ids")

    def specials(tok: Any) -> dict[str, Any]:
        return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id, "unk_token_id": tok.unk_token_id,
                "special token ids": sorted(tok.all_special_ids)}

    sa, sb = specials(ta), specials(ha)
    facts = [(k, sa[k], sb[k]) for k in sa]
    facts += [("start tokens (prefix_id)", t.prefix_id, h.prefix_id),
              ("end-of-sequence ids", sorted(t.eos_ids), sorted(h.eos_ids)),
              ("logit widths (config vocab_size)", getattr(t.config, "vocab_size", None),
               getattr(h.config, "vocab_size", None))]
    for what, a, b in facts:
        if a != b:
            return f"the {what} differ: {t.name} {a!r}, {h.name} {b!r}"
    if getattr(ta, "chat_template", None) != getattr(ha, "chat_template", None):
        return "the chat templates differ (a chat prompt would be two different token sequences)"
    if t.encode(PROBE) != h.encode(PROBE):
        return "the tokenizers split the same text differently (normalizer or pre-tokenizer)"
    return None


# the built-in span profile's gate in-process: the shipped learned gate with a copy lock
# (gates.CopyLockGate: the transformer while an 8-token induction match holds, or a 2-token
# one whose tokens occur in the prompt: the answer is copying the user's text; chosen on
# speed and chat faithfulness, docs/span.md "Choosing the copy lock"), and elsewhere, where
# its score is within 2 nats of its boundary, both models' mixture leaning toward its side
# (gates.MixGate, tilt 1.5: the transformer's weight sigmoid(1.5 x the score's signed
# distance)). Margin and tilt chosen by nested leave-one-source-out on the real suite's
# training sources (python -m evals.span.tilt: (2, 1.5) for every source). Held out by
# source it is 0.216 nats/token better than always-transformer and 0.007 [-0.004, +0.018]
# better than the 50/50 mixture (issue #23's bars); through the router it decodes copy
# prompts 1.57-1.74x and general ones 1.37-1.61x the transformer alone (four runs; the
# rename prompt 0.81-1.08x; docs/span.md, "Leaning the mixture toward the gate"). Mixing
# inside locked copies too (-lock-2) is 0.06 better than the mixture but too slow to be
# the default (docs/span.md, "Mixing inside locked copies too")
DEFAULT_LEARNED_GATE = "learned+copy-8-prompt-2+mix-2-tilt-1.5"


@functools.cache
def default_gate_name() -> str:
    """:data:`DEFAULT_LEARNED_GATE` when a trained gate ships in
    ``models/span/default_gate/`` and loads, else :data:`DEFAULT_GATE` (checked once per
    process)."""
    if DEFAULT_GATE_DIR.exists():
        try:
            get_gate(DEFAULT_LEARNED_GATE)
            return DEFAULT_LEARNED_GATE
        except Exception as exc:  # noqa: BLE001 - any failure: the rule gate, said in the log
            log.warning("span: %s exists but the learned gate does not load (%s: %s); "
                        "using %s", DEFAULT_GATE_DIR, type(exc).__name__, exc, DEFAULT_GATE)
    return DEFAULT_GATE


def gate_prompt_ids(backend: HFBackend, prompt: Prompt) -> list[int]:
    """The ids the models read before the answer, ``[start token, *prompt tokens]``: what
    the decoder gives ``gate.start`` (a teacher-forced evaluation gives it the same); a
    :class:`~models.base.TokenIds` prompt as given."""
    return backend.prompt_ids(prompt)


def entropy_nats(logits: Any) -> float:
    """Entropy (nats) of softmax(``logits``), a 1-D tensor of next-token logits."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(lp.exp() * lp).sum())


def entropies_nats(logits: Any) -> Any:
    """Entropies (nats) of softmax over each row of a 2-D tensor of next-token logits."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    return -(lp.exp() * lp).sum(-1)


def token_text_fn(tokenizer: Any) -> Callable[[int], str]:
    """A token id -> its text (memoised), for gates that read brackets."""
    memo: dict[int, str] = {}

    def text(token_id: int) -> str:
        s = memo.get(token_id)
        if s is None:
            s = memo[token_id] = tokenizer.decode([token_id])
        return s

    return text


@dataclass
class Forward:
    """One forward pass of one model during a span generation."""

    role: Role
    tokens: int  # positions read (its cache grew by this many)
    prefill: int  # of them, prompt tokens (a model's first forward)
    catchup: int  # of them, answer tokens the other model produced (read late, batched)
    seconds: float  # the forward and moving its last logits to the CPU
    drafted: int = 0  # of them, drafted tokens after the sequence (verified by this forward)
    accepted: int = 0  # of the drafted, those that became answer tokens read in this forward


@dataclass
class SpanTrace:
    """What one span generation did, token by token (tests, ``archroute bench span``).

    ``token_ids``/``roles``/``entropies`` cover the answer tokens (an end-of-sequence token
    ends the answer and is not one of them). With ``keep_logits``, ``logits[i]`` are the
    float32 next-token logits the chosen model gave at step i (a final end-of-sequence
    step included; on a mixed step, the log-probabilities of both models' mixture)
    and ``logit_roles[i]`` that model. ``mixed[i]``: token i was predicted by the mixture
    (a :class:`~models.span.gates.MixGate` was unsure; ``roles[i]`` is still its choice). ``forwards`` has one entry per model
    forward: one per step without drafting; with drafting a verify forward serves several
    steps.
    """

    gate: str = ""
    keep_logits: bool = False
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    roles: list[Role] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)
    logits: list[Any] = field(default_factory=list)
    logit_roles: list[Role] = field(default_factory=list)
    draft_k: int = 0  # the decoder's draft setting (0: no drafting)
    seconds: float = 0.0  # the whole generation, prompt encoding included
    mixed: list[bool] = field(default_factory=list)  # per answer token: both models' mixture
    # per step (as ``logits``): a mixed token the transformer's distribution alone settled
    # (greedy, a mixture leaning on it: lean_token), the hybrid not asked
    settled: list[bool] = field(default_factory=list)

    @property
    def switches(self) -> int:
        return sum(a != b for a, b in zip(self.roles, self.roles[1:], strict=False))

    @property
    def catchup(self) -> int:
        return sum(f.catchup for f in self.forwards)

    @property
    def drafted(self) -> int:
        return sum(f.drafted for f in self.forwards)

    @property
    def accepted(self) -> int:
        return sum(f.accepted for f in self.forwards)

    def summary(self) -> dict[str, int | str]:
        """The totals a response reports: gate, answer tokens per model, switches, catch-up
        tokens (answer tokens a model read in a batch because the other produced them); with
        drafting on, the drafted tokens the transformer verified and how many it accepted."""
        out: dict[str, int | str] = {
            "gate": self.gate, "transformer": sum(r == "transformer" for r in self.roles),
            "hybrid": sum(r == "hybrid" for r in self.roles),
            "switches": self.switches, "catchup": self.catchup}
        if self.draft_k:
            out.update(drafted=self.drafted, accepted=self.accepted)
        if any(self.mixed):
            out["mixed"] = sum(self.mixed)
        return out


class _Cursor:
    """One model's place in the shared sequence: its cache and how many positions it read."""

    def __init__(self, role: Role, backend: HFBackend) -> None:
        self.role = role
        self.b = backend
        self.past: Any = None
        self.seen = 0

    def advance(self, seq: list[int], n_prompt: int, roles: list[Role],
                draft: list[int] | None = None) -> tuple[Any, Forward]:
        """Read ``seq[seen:]`` (and the ``draft`` tokens after it) in one forward; the
        next-token logits (float32, CPU) at the last position of ``seq`` and at each draft
        position: a ``[1 + len(draft), vocab]`` tensor. The cache then holds the draft too
        (:meth:`keep` rolls back what is not accepted)."""
        import torch

        drafted = list(draft or ())
        if self.seen >= len(seq):
            # the cache already holds the last token (an accepted draft, the gate then asking
            # for both models' mixture, or the hybrid's mixture deciding the drafted token):
            # read it again for the logits after it
            self.keep(len(seq) - 1)
        new = seq[self.seen:] + drafted
        t0 = time.perf_counter()
        res = self.b.model(input_ids=torch.tensor([new], device=self.b.device), use_cache=True,
                           **{self.b.cache_kw: self.past})
        self.past = getattr(res, "cache", None) or res.past_key_values
        logits = res.logits[0, -(len(drafted) + 1):].float().cpu()
        seconds = time.perf_counter() - t0
        prefill = max(0, n_prompt - self.seen)
        answer_from = max(self.seen, n_prompt) - n_prompt
        catchup = sum(r != self.role for r in roles[answer_from:])
        self.seen = len(seq) + len(drafted)
        return logits, Forward(self.role, len(new), prefill, catchup, seconds,
                               drafted=len(drafted))

    def keep(self, n: int) -> None:
        """Roll the cache back to its first ``n`` positions (drop rejected draft tokens)."""
        if n < self.seen:
            crop_cache(self.past, self.seen - n)
            self.seen = n


def _leans(state: Any, role: Role, greedy: bool) -> bool:
    """A greedy step the gate mixes, leaning on the transformer it chose (log-odds > 0): the
    transformer alone may settle its token (:func:`lean_token`)."""
    return greedy and state.mix and role == "transformer" and getattr(state, "mix_lo", 0.0) > 0


def lean_token(t_logits: Any, lo: float) -> int | None:
    """The greedy token of the mixture ``w p_T + (1 - w) p_H`` (``w = sigmoid(lo)``) when the
    transformer's logits alone settle it, else None. If the transformer's top token x has
    ``p_T(x) > 1 / (2w)``, then ``m(x) >= w p_T(x) > 1 - w p_T(x) >= m(y)`` for every other
    token y (``m(y) <= w p_T(y) + 1 - w``, ``p_T(y) <= 1 - p_T(x)``): x is the mixture's argmax
    whatever the hybrid predicts. A small margin keeps float rounding from deciding."""
    import math

    import torch

    w = 1.0 / (1.0 + math.exp(-lo))
    if w <= 0.5:
        return None
    p = torch.softmax(t_logits.float(), -1)
    top = int(torch.argmax(p))
    return top if float(p[top]) > 1.0 / (2.0 * w) + 1e-4 else None


def mixture_logits(a: Any, b: Any, lo: float = 0.0) -> Any:
    """Log-probabilities of the mixture of two next-token distributions given by their
    logits (float32 tensors of one shape) with ``a``'s weight ``w = sigmoid(lo)``:
    ``log(w p_a + (1 - w) p_b)`` (``lo`` = 0: the 50/50 mixture)."""
    import math

    import torch

    wa = -math.log1p(math.exp(-lo)) if lo > -30 else lo  # log sigmoid(lo), stable
    wb = -math.log1p(math.exp(lo)) if lo < 30 else -lo
    return torch.logaddexp(torch.log_softmax(a, -1) + wa, torch.log_softmax(b, -1) + wb)


def crop_cache(cache: Any, tokens_to_remove: int) -> None:
    """Drop the last ``tokens_to_remove`` positions of a transformers KV cache. A negative
    argument to ``Cache.crop`` removes that many positions in every transformers version
    (4.x read a positive one as the length to keep, 5.x refuses it)."""
    if tokens_to_remove > 0:
        cache.crop(-tokens_to_remove)


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length())


def induction_draft(matcher: InductionMatcher, k: int, min_match: int) -> list[int]:
    """Up to ``k`` tokens the induction match predicts (prompt lookup / n-gram drafting):
    when the last ``>= min_match`` tokens occurred earlier, the tokens that followed that
    earlier occurrence (its most recent one), continued periodically when the occurrence
    is closer than ``k`` tokens (``a b a b`` drafts ``a b ...``). Empty without a match."""
    if k <= 0 or matcher.match_len < min_match:
        return []
    ids, end = matcher.ids, len(matcher.ids)
    start = end - matcher.match_dist  # just after the earlier occurrence
    out: list[int] = []
    for j in range(k):
        i = start + j
        out.append(ids[i] if i < end else out[i - end])
    return out


def _roles_in(char_roles: list[tuple[Role, ...]], start: int, end: int,
              tail: tuple[Role, ...]) -> tuple[Role, ...]:
    """The roles behind characters ``start:end`` in order (``tail`` beyond ``char_roles``)."""
    seen: dict[Role, None] = {}
    for i in range(start, end):
        for r in char_roles[i] if i < len(char_roles) else tail:
            seen[r] = None
    return tuple(seen)


def check_draft(draft_k: int, draft_min_match: int) -> None:
    """A ValueError naming the setting unless ``draft_k`` is in 0..MAX_DRAFT_K and
    ``draft_min_match`` in 1..MAX_MATCH (integers, not booleans)."""
    for what, v, lo, hi in (("draft_k", draft_k, 0, MAX_DRAFT_K),
                            ("draft_min_match", draft_min_match, 1, MAX_MATCH)):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"{what}: must be an integer in {lo}..{hi}, got {v!r}")


def _uncroppable(backend: HFBackend) -> str | None:
    """Why ``backend``'s cache cannot drop positions (None: it can), from a 3-token probe."""
    import torch

    try:
        with backend.forward_lock, torch.no_grad():
            res = backend.model(input_ids=torch.tensor([[backend.prefix_id] * 3],
                                                       device=backend.device), use_cache=True)
            cache = getattr(res, "cache", None) or res.past_key_values
            crop_cache(cache, 1)
            n = cache_length(cache)
    except Exception as exc:  # noqa: BLE001 - any failure: it cannot
        return f"{backend.name}: {type(exc).__name__}: {exc}"
    return None if n == 2 else f"{backend.name}: its cache kept {n} of 3 positions, not 2"


class SpanBackend(Backend):
    """A composite backend: two in-process backends (transformer, hybrid) with one tokenizer,
    and a gate that picks per token which of them predicts it. See the module docstring.

    Refuses (:class:`IncompatiblePairError`) a pair that is not two :class:`HFBackend`
    instances with the same tokenizer. While it generates it holds both backends' forward
    locks (the transformer's first, always), so single-model requests wait as they would for
    each other. Scoring is not supported (score with a single backend)."""

    can_score = False

    def __init__(self, transformer: Backend, hybrid: Backend, gate: str | Gate = DEFAULT_GATE,
                 name: str | None = None, max_concurrency: int = 1, draft_k: int = 0,
                 draft_min_match: int = DEFAULT_DRAFT_MIN_MATCH) -> None:
        check_draft(draft_k, draft_min_match)
        why = pair_mismatch(transformer, hybrid)
        if why is not None:
            raise IncompatiblePairError(
                f"span decoding needs two in-process backends sharing a tokenizer: {why}")
        assert isinstance(transformer, HFBackend) and isinstance(hybrid, HFBackend)
        self.draft_k = draft_k
        self.draft_min_match = draft_min_match
        if draft_k:
            why = _uncroppable(transformer)
            if why is not None:
                raise IncompatiblePairError(f"draft_k: drafting needs a transformer whose cache "
                                            f"can be rolled back: {why}")
        self.gate: Gate = get_gate(gate) if isinstance(gate, str) else gate
        super().__init__(name or f"span:{self.gate.name}", max_concurrency)
        self.transformer = transformer
        self.hybrid = hybrid
        self.context_length: int = min(transformer.context_length, hybrid.context_length)
        self.eos_ids = set(transformer.eos_ids)
        self._token_text = token_text_fn(transformer.tokenizer)

    def info(self) -> BackendInfo:
        ti, hi = self.transformer.info(), self.hybrid.info()
        return BackendInfo(name=self.name, architecture="other",
                           parameters=(ti.parameters or 0) + (hi.parameters or 0),
                           context_length=self.context_length,
                           location=f"{self.transformer.name}+{self.hybrid.name}")

    # ---- generation ------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: GenerationParams,
                 trace: SpanTrace | None = None) -> GenerationResult:
        text, n_prompt, n_out, reason, span = "", 0, 0, "length", None
        for chunk in self.stream(prompt, params, trace=trace):
            text += chunk.text
            if chunk.finish_reason is not None:
                reason, span = chunk.finish_reason, chunk.span
                n_prompt, n_out = chunk.prompt_tokens or 0, chunk.completion_tokens or 0
        return GenerationResult(text, n_prompt, n_out, reason, span=span)  # type: ignore[arg-type]

    def stream(self, prompt: Prompt, params: GenerationParams,
               trace: SpanTrace | None = None) -> Iterator[StreamChunk]:
        """Span decoding, one chunk per step; each chunk with text names the model(s) whose
        tokens it holds (``span_roles``), the last one carries the totals (``span``).
        ``trace`` (optional) is filled with what each step did."""
        import torch

        t0 = time.perf_counter()
        ids = gate_prompt_ids(self.transformer, prompt)
        room = self.context_length - len(ids)
        if room < 1:
            raise RequestError(
                f"the prompt is {len(ids)} tokens (with the start token); the context length of "
                f"{self.name} is {self.context_length} tokens (the smaller of "
                f"{self.transformer.name} and {self.hybrid.name}), which leaves no room to generate")
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else int(torch.seed() % 2**63))
        greedy = params.temperature == 0.0
        tr = trace if trace is not None else SpanTrace()
        tr.gate, tr.prompt_ids, tr.draft_k = self.gate.name, list(ids), self.draft_k
        seq = list(ids)
        cursors = {"transformer": _Cursor("transformer", self.transformer),
                   "hybrid": _Cursor("hybrid", self.hybrid)}
        state = self.gate.start(ids, self._token_text)
        # drafting reads the gate's induction matcher (every GateState keeps one over the
        # whole sequence); a gate state without one gets its own
        matcher = state.matcher if isinstance(state, GateState) else None
        if self.draft_k and matcher is None:
            matcher = InductionMatcher()
            matcher.extend(ids)
        own_matcher = matcher is not None and not isinstance(state, GateState)
        out = StreamText(self.transformer.tokenizer, params.stop)
        char_roles: list[tuple[Role, ...]] = []  # per character of out.text, its token's role(s)
        pending: list[Role] = []  # roles of tokens not yet decoded into whole characters
        reason = "length"
        role: Role | None = None  # the gate's choice for the next token, once asked
        mix = False  # and whether it asked for both models' mixture there
        done = False
        # both locks for the whole answer, always in this order (no deadlock between spans)
        with self.transformer.forward_lock, self.hybrid.forward_lock, torch.no_grad():
            try:
                while not done and len(tr.token_ids) < max_new:
                    if role is None:
                        role = state.choose()
                        mix = state.mix
                    cursor = cursors.get(role)
                    if cursor is None:
                        raise BackendError(f"{self.name}: gate {self.gate.name!r} chose "
                                           f"{role!r}, not one of {ROLES}")
                    # a mixture leaning on the transformer, decoded greedily: the transformer
                    # alone can settle its argmax (lean_token), drafts included
                    lean = _leans(state, role, greedy)
                    draft: list[int] = []
                    if (role == "transformer" and self.draft_k and matcher is not None
                            and (not mix or lean)):
                        # a verify forward gives one more token than it drafts: no draft
                        # beyond the budget
                        draft = induction_draft(matcher, min(self.draft_k,
                                                             max_new - len(tr.token_ids) - 1),
                                                self.draft_min_match)
                    n_before = len(seq)
                    logits_all, fwd = cursor.advance(seq, len(ids), tr.roles, draft)
                    tr.forwards.append(fwd)
                    ents = entropies_nats(logits_all) if draft or lean else None
                    if mix and not lean:
                        # the gate is unsure: both models predict this token, their
                        # distributions averaged (the other one catches up first)
                        other = cursors["hybrid" if role == "transformer" else "transformer"]
                        other_logits, ofwd = other.advance(seq, len(ids), tr.roles)
                        tr.forwards.append(ofwd)
                        ents = entropies_nats(logits_all)  # the chosen model's, for the gate
                        # the gate's weight for the transformer (log-odds), seen from the
                        # chosen model's side
                        lo = getattr(state, "mix_lo", 0.0)
                        lo = lo if cursor.role == "transformer" else -lo
                        logits_all = mixture_logits(logits_all[0], other_logits[0], lo)[None]
                    accepted = 0
                    for j in range(len(draft) + 1):
                        if j > 0:
                            # the model read draft[j - 1], which became the last answer
                            # token: the gate decides the next position as without drafting
                            role = state.choose()
                            mix = state.mix
                            lean = _leans(state, role, greedy)
                            if role != cursor.role or (mix and not lean):
                                break
                        logits = logits_all[j]
                        sure = False
                        nxt_sure: int | None = None
                        if lean:
                            nxt_sure = lean_token(logits, state.mix_lo)
                            sure = nxt_sure is not None
                            if not sure:
                                # the transformer alone cannot settle it: the hybrid catches
                                # up and both models' mixture decides this token
                                other = cursors["hybrid"]
                                other_logits, ofwd = other.advance(seq, len(ids), tr.roles)
                                tr.forwards.append(ofwd)
                                logits = mixture_logits(logits, other_logits[0], state.mix_lo)
                        if tr.keep_logits:
                            tr.logits.append(logits)
                            tr.logit_roles.append(cursor.role)
                        tr.settled.append(sure)
                        # greedy: argmax equality; sampling: the speculative rule for a
                        # point-mass draft (module docstring), one draw per token either way
                        if nxt_sure is not None:
                            nxt = nxt_sure
                        else:
                            nxt = sample_next(logits, params.temperature, params.top_p, gen)
                        if nxt in self.eos_ids and not params.ignore_eos:
                            reason, done = "stop", True
                            break
                        ent = float(ents[j]) if ents is not None else entropy_nats(logits)
                        state.push(nxt, cursor.role, ent)
                        if own_matcher:
                            assert matcher is not None
                            matcher.push(nxt)
                        seq.append(nxt)
                        tr.token_ids.append(nxt)
                        tr.roles.append(cursor.role)
                        tr.mixed.append(mix)
                        tr.entropies.append(ent)
                        pending.append(cursor.role)
                        n_text, was = len(out.text), out.emitted
                        piece = out.push(nxt)
                        if len(out.text) > n_text:
                            who = tuple(dict.fromkeys(pending))
                            char_roles.extend([who] * (len(out.text) - n_text))
                            pending = []
                        role = None
                        if j < len(draft) and nxt == draft[j]:
                            accepted = j + 1  # the cache holds this token at its position
                        if piece is None:  # a stop sequence completed
                            reason, done = "stop", True
                            break
                        # one chunk per step (empty while held back): a consumer that stops
                        # reading stops the decoding within one step
                        yield StreamChunk(piece, span_roles=_roles_in(
                            char_roles, was, out.emitted, ()) if piece else None)
                        if (len(tr.token_ids) >= max_new or j >= len(draft) or nxt != draft[j]
                                or (lean and not sure)):
                            break
                    if draft:
                        fwd.accepted = accepted
                        cursor.keep(n_before + accepted)  # roll back the rejected drafts
            except (RequestError, BackendError):
                raise
            except Exception as exc:  # noqa: BLE001 - surfaced as a backend failure
                raise BackendError(f"{self.name}: generation failed: {exc}") from exc
        was = out.emitted
        rest = out.finish()
        if rest:
            tail = tuple(dict.fromkeys(pending)) or tuple(tr.roles[-1:])
            yield StreamChunk(rest, span_roles=_roles_in(char_roles, was, out.emitted, tail))
        tr.seconds = time.perf_counter() - t0
        yield StreamChunk("", reason, len(ids) - 1, len(tr.token_ids),  # type: ignore[arg-type]
                          span=tr.summary())

    # ---- scoring ---------------------------------------------------------------------
    def score(self, prompt: str, continuation: str) -> ScoreResult:
        raise RequestError("span backend: scoring is not supported; score with a single backend")
