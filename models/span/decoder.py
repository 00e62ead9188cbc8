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
from models.span.gates import Gate, Role, get_gate

log = logging.getLogger(__name__)

ROLES: tuple[Role, Role] = ("transformer", "hybrid")
DEFAULT_GATE = "copy-2"  # when no trained gate ships (see default_gate_name)
DEFAULT_GATE_DIR = Path(__file__).resolve().parent / "default_gate"
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


@functools.cache
def default_gate_name() -> str:
    """``learned`` when a trained gate ships in ``models/span/default_gate/`` and loads,
    else :data:`DEFAULT_GATE` (checked once per process)."""
    if DEFAULT_GATE_DIR.exists():
        try:
            get_gate("learned")
            return "learned"
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


@dataclass
class SpanTrace:
    """What one span generation did, token by token (tests, ``archroute bench span``).

    ``token_ids``/``roles``/``entropies`` cover the answer tokens (an end-of-sequence token
    ends the answer and is not one of them). With ``keep_logits``, ``logits[i]`` are the
    float32 next-token logits the chosen model gave at step i (a final end-of-sequence
    step included).
    """

    gate: str = ""
    keep_logits: bool = False
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    roles: list[Role] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)
    logits: list[Any] = field(default_factory=list)
    seconds: float = 0.0  # the whole generation, prompt encoding included

    @property
    def switches(self) -> int:
        return sum(a != b for a, b in zip(self.roles, self.roles[1:], strict=False))

    @property
    def catchup(self) -> int:
        return sum(f.catchup for f in self.forwards)

    def summary(self) -> dict[str, int | str]:
        """The totals a response reports: gate, answer tokens per model, switches, catch-up
        tokens (answer tokens a model read in a batch because the other produced them)."""
        return {"gate": self.gate,
                "transformer": sum(r == "transformer" for r in self.roles),
                "hybrid": sum(r == "hybrid" for r in self.roles),
                "switches": self.switches, "catchup": self.catchup}


class _Cursor:
    """One model's place in the shared sequence: its cache and how many positions it read."""

    def __init__(self, role: Role, backend: HFBackend) -> None:
        self.role = role
        self.b = backend
        self.past: Any = None
        self.seen = 0

    def advance(self, seq: list[int], n_prompt: int, roles: list[Role]) -> tuple[Any, Forward]:
        """Read ``seq[seen:]`` in one forward; the last position's logits (float32, CPU)."""
        import torch

        new = seq[self.seen:]
        t0 = time.perf_counter()
        res = self.b.model(input_ids=torch.tensor([new], device=self.b.device), use_cache=True,
                           **{self.b._cache_kw: self.past})
        self.past = getattr(res, "cache", None) or res.past_key_values
        logits = res.logits[0, -1].float().cpu()
        seconds = time.perf_counter() - t0
        prefill = max(0, n_prompt - self.seen)
        answer_from = max(self.seen, n_prompt) - n_prompt
        catchup = sum(r != self.role for r in roles[answer_from:])
        self.seen = len(seq)
        return logits, Forward(self.role, len(new), prefill, catchup, seconds)


def _roles_in(char_roles: list[tuple[Role, ...]], start: int, end: int,
              tail: tuple[Role, ...]) -> tuple[Role, ...]:
    """The roles behind characters ``start:end`` in order (``tail`` beyond ``char_roles``)."""
    seen: dict[Role, None] = {}
    for i in range(start, end):
        for r in char_roles[i] if i < len(char_roles) else tail:
            seen[r] = None
    return tuple(seen)


class SpanBackend(Backend):
    """A composite backend: two in-process backends (transformer, hybrid) with one tokenizer,
    and a gate that picks per token which of them predicts it. See the module docstring.

    Refuses (:class:`IncompatiblePairError`) a pair that is not two :class:`HFBackend`
    instances with the same tokenizer. While it generates it holds both backends' forward
    locks (the transformer's first, always), so single-model requests wait as they would for
    each other. Scoring is not supported (score with a single backend)."""

    can_score = False

    def __init__(self, transformer: Backend, hybrid: Backend, gate: str | Gate = DEFAULT_GATE,
                 name: str | None = None, max_concurrency: int = 1) -> None:
        why = pair_mismatch(transformer, hybrid)
        if why is not None:
            raise IncompatiblePairError(
                f"span decoding needs two in-process backends sharing a tokenizer: {why}")
        assert isinstance(transformer, HFBackend) and isinstance(hybrid, HFBackend)
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
        tr = trace if trace is not None else SpanTrace()
        tr.gate, tr.prompt_ids = self.gate.name, list(ids)
        seq = list(ids)
        cursors = {"transformer": _Cursor("transformer", self.transformer),
                   "hybrid": _Cursor("hybrid", self.hybrid)}
        state = self.gate.start(ids, self._token_text)
        out = StreamText(self.transformer.tokenizer, params.stop)
        char_roles: list[tuple[Role, ...]] = []  # per character of out.text, its token's role(s)
        pending: list[Role] = []  # roles of tokens not yet decoded into whole characters
        reason = "length"
        # both locks for the whole answer, always in this order (no deadlock between spans)
        with self.transformer._forward_lock, self.hybrid._forward_lock, torch.no_grad():
            try:
                for _ in range(max_new):
                    role = state.choose()
                    cursor = cursors.get(role)
                    if cursor is None:
                        raise BackendError(f"{self.name}: gate {self.gate.name!r} chose "
                                           f"{role!r}, not one of {ROLES}")
                    logits, fwd = cursor.advance(seq, len(ids), tr.roles)
                    tr.forwards.append(fwd)
                    if tr.keep_logits:
                        tr.logits.append(logits)
                    nxt = sample_next(logits, params.temperature, params.top_p, gen)
                    if nxt in self.eos_ids and not params.ignore_eos:
                        reason = "stop"
                        break
                    ent = entropy_nats(logits)
                    state.push(nxt, role, ent)
                    seq.append(nxt)
                    tr.token_ids.append(nxt)
                    tr.roles.append(role)
                    tr.entropies.append(ent)
                    pending.append(role)
                    n_text, was = len(out.text), out.emitted
                    piece = out.push(nxt)
                    if len(out.text) > n_text:
                        who = tuple(dict.fromkeys(pending))
                        char_roles.extend([who] * (len(out.text) - n_text))
                        pending = []
                    if piece is None:  # a stop sequence completed
                        reason = "stop"
                        break
                    # one chunk per step (empty while held back): a consumer that stops
                    # reading stops the decoding within one step
                    yield StreamChunk(piece, span_roles=_roles_in(char_roles, was, out.emitted, ())
                                      if piece else None)
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
