"""Span decoding over two OpenAI-compatible engines: spans, not tokens (a prototype).

The in-process decoder (:mod:`models.span.decoder`) runs one decode step of the chosen model
per token. Across two engines (two ``archroute serve-model`` processes, vLLM, SGLang) a
request per token would pay a round trip and a scheduling step per token, so this backend
asks the chosen engine for a **span** and lets it decode until the gate switches:

1. ``POST /v1/completions`` with ``prompt`` = the token ids so far (read as given by the
   engine: no re-tokenization at the seams), ``max_tokens`` = the remaining budget,
   ``stream``, ``logprobs: 1`` and ``return_tokens_as_token_ids`` (vLLM's extension, which
   ``serve-model`` speaks too), so each streamed event names its token id;
2. each token is pushed into the gate as it arrives; while ``choose()`` keeps the model the
   span goes on, in the same request;
3. when the gate names the other model the stream is closed (the engine sees the client go
   and stops decoding) and the tokens that arrived after the switch point are dropped (the
   *wasted* tokens); the other engine gets a new request with the whole sequence so far. An
   engine with prefix caching (vLLM APC, SGLang's radix cache) serves what it read at its
   last turn from its cache, so the catch-up is a cached prefill of the skipped tokens;
   ``serve-model`` has no prefix cache and prefills the whole sequence again.

A span ends when the gate switches, at an end-of-sequence token (``finish_reason: stop``),
at the token budget, or at a client stop sequence, which is checked here on the
concatenated text (a stop sequence can straddle a span boundary) with the same holdback as
a single backend (:class:`models.hf.StreamText`).

Gates that read the producing model's entropy: the completions API does not return it, but
``logprobs: k`` returns the k most likely tokens' log-probabilities, from which
:func:`topk_entropy` computes a lower bound of the entropy. A learned gate trained on that
proxy (its artifact says ``meta.entropy: "topk:K"``; ``python -m evals.span.topk``) runs
over engines: each span asks for ``logprobs: K`` and the gate is pushed the proxy of the
model that produced each token. A gate that reads the full entropy (the shipped ``learned``)
is refused. Sampling is per span: with a ``seed``, span i is sampled with
``seed + i``, so an answer is reproducible but not the in-process decoder's sample for
sample; greedy decoding (``temperature: 0``) gives the same tokens as the in-process decoder
(tested against two real ``serve-model`` processes).

    archroute bench span-remote          # tokens/s, requests and waste against in-process
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
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
    TokenIds,
)
from models.hf import StreamText, render_prompt
from models.span.decoder import token_text_fn
from models.span.gates import Gate, Role, get_gate
from models.upstream import OpenAIUpstreamBackend

ENTROPY_GATES = ("learned", "learned-topk")  # gates (by name before any ':') that read the model's entropy
MAX_TOPK = 5  # the most log-probabilities a completions request asks for (OpenAI's limit)
# how one span's request to an engine is admitted: a context manager per request, by role,
# around it (the router's: the engine's own slot, so its limits and its one circuit breaker
# see every call to it, :meth:`router.pool.BackendSlot.held`); by default none
Admit = Callable[[Role], AbstractAsyncContextManager[object]]


def _admit_all(_role: Role) -> AbstractAsyncContextManager[object]:
    return contextlib.nullcontext()


class RemoteSpanError(RequestError):
    """This pair or gate cannot be span-decoded over engines (a 400 in the API)."""


def reads_entropy(gate: Gate) -> bool:
    inner = getattr(gate, "inner", None)  # a wrapper (gates.CopyLockGate) reads what it wraps
    if isinstance(inner, Gate):
        return reads_entropy(inner)
    return bool(getattr(gate, "reads_entropy", gate.name.split(":")[0] in ENTROPY_GATES))


def _mixes(gate: Gate) -> bool:
    """Whether ``gate`` or a gate it wraps is a :class:`~models.span.gates.MixGate`."""
    g: Gate | None = gate
    while g is not None:
        if getattr(g, "mix_margin", None):
            return True
        g = getattr(g, "inner", None)
    return False


def entropy_topk(gate: Gate) -> int | None:
    """k when ``gate`` was trained on the top-k entropy proxy (its artifact's
    ``meta.entropy`` is ``"topk:K"``), else None."""
    spec = (getattr(gate, "meta", None) or {}).get("entropy")
    if isinstance(spec, str) and spec.startswith("topk:") and spec[5:].isdigit():
        return int(spec[5:])
    return None


def topk_entropy(logprobs: Iterable[float], k: int) -> float:
    """A lower bound (nats) of the entropy of a next-token distribution from its ``k``
    largest log-probabilities (more are cut to the k largest): the top k's own terms, and
    the remaining mass ``m`` as ``-m log p_k`` (every other token is at most as likely as
    the k-th, ``p_k``, so each of its terms ``-q log q >= -q log p_k``). What a learned
    gate trained on the proxy reads over engines, and what its training computes from full
    logits (:mod:`evals.span.topk`)."""
    top = sorted(logprobs, reverse=True)[:k]
    if not top:
        return 0.0
    ps = [math.exp(lp) for lp in top]
    tail = max(0.0, 1.0 - sum(ps))
    return -sum(p * lp for p, lp in zip(ps, top, strict=True)) - tail * top[-1]


@dataclass
class Span:
    """One request to one engine."""

    role: Role
    kept: int = 0  # tokens of the answer it produced
    wasted: int = 0  # tokens that arrived after the gate switched away (dropped)
    read: int = 0  # the sequence length it was sent (prompt + answer so far)
    first_token_s: float = float("nan")  # request sent -> first token
    seconds: float = 0.0  # request sent -> stream closed


@dataclass
class RemoteTrace:
    """What one generation did (tests, ``archroute bench span-remote``)."""

    token_ids: list[int] = field(default_factory=list)
    roles: list[Role] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def switches(self) -> int:
        return sum(a != b for a, b in zip(self.roles, self.roles[1:], strict=False))

    def summary(self, gate: str) -> dict[str, int | str]:
        return {"gate": gate, "transformer": sum(r == "transformer" for r in self.roles),
                "hybrid": sum(r == "hybrid" for r in self.roles), "switches": self.switches,
                "requests": len(self.spans), "wasted": sum(s.wasted for s in self.spans)}


def _event_tokens(data: dict, name: str) -> tuple[list[int], list[dict | None], str | None]:
    """(token ids, each token's top log-probabilities {token: log-prob} or None, finish
    reason) of one streamed completions event."""
    if "error" in data:
        raise BackendError(f"{name}: upstream stream error: {data['error']}")
    ids: list[int] = []
    tops: list[dict | None] = []
    finish = None
    for choice in data.get("choices") or []:
        lp = choice.get("logprobs") or {}
        top = lp.get("top_logprobs") or []
        for j, tok in enumerate(lp.get("tokens") or []):
            if not (isinstance(tok, str) and tok.startswith("token_id:")):
                raise BackendError(f"{name}: the engine did not return token ids (send "
                                   "return_tokens_as_token_ids; vLLM and serve-model do)")
            ids.append(int(tok[len("token_id:"):]))
            tops.append(top[j] if j < len(top) and isinstance(top[j], dict) else None)
        finish = choice.get("finish_reason") or finish
    return ids, tops, finish


class RemoteSpanBackend(Backend):
    """A composite backend over two OpenAI-compatible engines that share ``tokenizer``
    (a Hugging Face tokenizer, local): the gate picks the engine per token, each engine
    decodes a span until the gate switches. See the module docstring. ``admit`` wraps each
    span's request to an engine (:data:`Admit`; the router passes the engines' slots)."""

    can_score = False

    def __init__(self, transformer: OpenAIUpstreamBackend, hybrid: OpenAIUpstreamBackend,
                 tokenizer: Any, gate: str | Gate, name: str | None = None,
                 context_length: int | None = None, prefix_id: int | None = None,
                 max_concurrency: int = 16, admit: Admit = _admit_all) -> None:
        for b in (transformer, hybrid):
            if not isinstance(b, OpenAIUpstreamBackend):
                raise RemoteSpanError(f"span decoding over engines needs two OpenAI-compatible "
                                      f"upstreams; {b.name} is not one")
        self.gate: Gate = get_gate(gate) if isinstance(gate, str) else gate
        self.topk = entropy_topk(self.gate)
        if _mixes(self.gate):
            raise RemoteSpanError(
                f"gate {self.gate.name!r} mixes both models' full next-token distributions "
                "where it is unsure (+mix-M), which the completions API does not return; "
                "over engines use the gate without +mix-M")
        if reads_entropy(self.gate) and self.topk is None:
            raise RemoteSpanError(
                f"gate {self.gate.name!r} reads each model's entropy, which the completions "
                "API does not return; use a gate over tokens (copy-k, brackets) for engines, "
                "or the learned gate trained on the top-5 proxy that ships for engines "
                "(learned-topk; your own: python -m evals.span.topk)")
        if self.topk is not None and not 1 <= self.topk <= MAX_TOPK:
            raise RemoteSpanError(f"gate {self.gate.name!r} reads the top-{self.topk} entropy "
                                  f"proxy; the completions API returns at most {MAX_TOPK}")
        super().__init__(name or f"span-remote:{self.gate.name}", max_concurrency)
        self.transformer = transformer
        self.hybrid = hybrid
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.admit = admit
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix_id = prefix_id if prefix_id is not None else (bos if bos is not None else eos)
        # vLLM streams the end-of-sequence token itself (serve-model does not): it ends the
        # answer and is no token of it, as in the in-process decoder
        self.eos_ids = {eos} if eos is not None else set()
        self._token_text = token_text_fn(tokenizer)

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, "other", context_length=self.context_length,
                           location=f"{self.transformer.base_url}+{self.hybrid.base_url}")

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """``[start token, *tokens of the rendered prompt]`` (as the in-process decoder), or
        a :class:`TokenIds` prompt as given."""
        if isinstance(prompt, TokenIds):
            return list(prompt.ids)
        text = self.render(prompt)
        return [self.prefix_id, *self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tokenizer, prompt)

    # ---- generation ------------------------------------------------------------------
    async def astream(self, prompt: Prompt, params: GenerationParams,
                      trace: RemoteTrace | None = None) -> AsyncIterator[StreamChunk]:
        t0 = time.perf_counter()
        seq = self.prompt_ids(prompt)
        n_prompt = len(seq)
        room = None if self.context_length is None else self.context_length - n_prompt
        if room is not None and room < 1:
            raise RequestError(f"the prompt is {n_prompt} tokens; the context length of "
                               f"{self.name} is {self.context_length} tokens")
        budget = params.max_tokens if room is None else min(params.max_tokens or room, room)
        if budget is None:
            raise RequestError("max_tokens: required for span decoding over engines whose "
                               "context length is unknown")
        tr = trace if trace is not None else RemoteTrace()
        state = self.gate.start(seq, self._token_text)
        out = StreamText(self.tokenizer, params.stop)
        engines = {"transformer": self.transformer, "hybrid": self.hybrid}
        reason = "length"
        role: Role = state.choose()  # type: ignore[assignment]
        done = False
        while not done and len(tr.token_ids) < budget:
            up = engines.get(role)
            if up is None:
                raise BackendError(f"{self.name}: gate chose {role!r}")
            span = Span(role, read=len(seq))
            tr.spans.append(span)
            body: dict[str, Any] = {
                "model": up.model, "prompt": list(seq), "max_tokens": budget - len(tr.token_ids),
                "temperature": params.temperature, "top_p": params.top_p, "stream": True,
                "logprobs": self.topk or 1, "return_tokens_as_token_ids": True}
            if params.seed is not None:
                body["seed"] = params.seed + len(tr.spans) - 1
            if params.ignore_eos:
                body["ignore_eos"] = True
            s0 = time.perf_counter()
            nxt: Role = role
            async with self._span_request(role, up, body) as lines:
                async for line in lines:
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    ids, tops, finish = _event_tokens(json.loads(line[5:]), up.name)
                    for tok, top in zip(ids, tops, strict=True):
                        if nxt != role:  # arrived after the switch point
                            span.wasted += 1
                            continue
                        if tok in self.eos_ids and not params.ignore_eos:
                            reason, done = "stop", True
                            break
                        if span.kept == 0:
                            span.first_token_s = time.perf_counter() - s0
                        span.kept += 1
                        state.push(tok, role, self._entropy(top, up.name))
                        seq.append(tok)
                        tr.token_ids.append(tok)
                        tr.roles.append(role)
                        piece = out.push(tok)
                        if piece is None:  # a stop sequence completed
                            reason, done = "stop", True
                            break
                        if piece:
                            yield StreamChunk(piece, span_roles=(role,), token_ids=(tok,))
                        if len(tr.token_ids) >= budget:
                            done = True
                            break
                        nxt = state.choose()  # type: ignore[assignment]
                    if done or nxt != role:
                        break  # leaving the block closes the stream: the engine stops
                    if finish is not None:
                        if finish == "stop":
                            reason = "stop"
                        done = True  # end of sequence, or the engine's own limit
                        break
                span.seconds = time.perf_counter() - s0
                if not done and nxt == role:  # the stream ended without a finish reason
                    raise BackendError(f"{up.name}: the stream ended early")  # (the engine's)
            role = nxt
        rest = out.finish()
        if rest:
            yield StreamChunk(rest, span_roles=tuple(tr.roles[-1:]))
        tr.seconds = time.perf_counter() - t0
        yield StreamChunk("", reason, n_prompt, len(tr.token_ids),  # type: ignore[arg-type]
                          span=tr.summary(self.gate.name))

    def _entropy(self, top: dict | None, name: str) -> float | None:
        """The top-k entropy proxy of one streamed token (None: the gate reads none)."""
        if self.topk is None:
            return None
        if not top:
            raise BackendError(f"{name}: the engine returned no top_logprobs; the gate "
                               f"{self.gate.name!r} needs logprobs: {self.topk}")
        return topk_entropy(top.values(), self.topk)

    @contextlib.asynccontextmanager
    async def _span_request(self, role: Role, up: OpenAIUpstreamBackend,
                            body: dict[str, Any]) -> AsyncIterator[AsyncIterator[str]]:
        """One span's streamed request to engine ``up``, admitted by ``self.admit``: the
        stream's lines until the block is left (which closes the stream)."""
        async with self.admit(role):
            with up.errors():
                async with up.sse_lines("/completions", body) as lines:
                    yield lines

    async def agenerate(self, prompt: Prompt, params: GenerationParams,
                        trace: RemoteTrace | None = None) -> GenerationResult:
        text, last = "", StreamChunk("")
        async for chunk in self.astream(prompt, params, trace=trace):
            text += chunk.text
            last = chunk
        return GenerationResult(text, last.prompt_tokens or 0, last.completion_tokens or 0,
                                last.finish_reason or "length", span=last.span)

    def generate(self, prompt: Prompt, params: GenerationParams,
                 trace: RemoteTrace | None = None) -> GenerationResult:
        """Blocking form (scripts, benchmarks): its own event loop, pools closed after."""
        async def run() -> GenerationResult:
            try:
                return await self.agenerate(prompt, params, trace=trace)
            finally:
                await self.aclose()

        return asyncio.run(run())

    def stream(self, prompt: Prompt, params: GenerationParams) -> Iterator[StreamChunk]:
        raise BackendError(f"{self.name}: streams only from an event loop (astream)")

    async def aclose(self) -> None:
        await self.transformer.aclose()
        await self.hybrid.aclose()

    def score(self, prompt: str, continuation: str) -> ScoreResult:
        raise RequestError("span backend: scoring is not supported; score with a single backend")
