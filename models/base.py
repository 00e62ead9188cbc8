"""The one interface every serving or scoring backend implements.

A backend is synchronous at heart (a forward pass blocks); the ``a*`` methods run it off
the event loop so the router never blocks. Backends that talk HTTP override the ``a*``
methods with native async clients.
"""

from __future__ import annotations

import asyncio
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool", "developer"]
Architecture = Literal["transformer", "hybrid", "other"]


def stated_architecture(role: str | None) -> Architecture:
    """The architecture an operator's ``role`` states: "transformer" or "hybrid", else "other"."""
    if role == "transformer":
        return "transformer"
    if role == "hybrid":
        return "hybrid"
    return "other"


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; ``content`` is plain text (multi-part content is flattened upstream).

    Tool calling (OpenAI's shape, kept as the client sent it): ``tool_calls`` on an
    assistant turn (``[{"id", "type": "function", "function": {"name", "arguments"}}]``),
    ``tool_call_id`` on a ``tool`` turn (the call it answers), ``name`` as the client gave it.
    An upstream receives them as they are; in-process backends see :meth:`plain`."""

    role: Role
    content: str
    tool_calls: list[dict[str, Any]] | None = field(default=None, hash=False)
    tool_call_id: str | None = None
    name: str | None = None

    def plain(self) -> str:
        """The turn as text for a model that does not call tools: ``content``, then each tool
        call on its own line as ``[tool call] NAME(ARGUMENTS)``."""
        if not self.tool_calls:
            return self.content
        calls = []
        for call in self.tool_calls:
            fn = call.get("function") if isinstance(call, dict) else None
            fn = fn if isinstance(fn, dict) else {}
            args = fn.get("arguments", "")
            args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            calls.append(f"[tool call] {fn.get('name', '')}({args})")
        return "\n".join([self.content, *calls] if self.content else calls)


@dataclass(frozen=True)
class TokenIds:
    """A prompt given as token ids, read exactly as given: no start token is added and no
    template applied (what an engine's completions API takes as ``prompt: [ids]``). Only a
    backend with ``accepts_token_ids`` takes one; the span decoder over two engines
    (:mod:`models.span.remote`) continues an answer this way, with no re-tokenization at
    the seams."""

    ids: tuple[int, ...]


Prompt = str | Sequence[ChatMessage] | TokenIds
"""A raw completion prompt (str), a chat conversation (messages) or token ids."""



class RequestError(ValueError):
    """The request cannot be served as asked, and it is the client's fault: too long for the
    context, parameters out of range, refused as invalid by an upstream. The router answers
    400, does not fall back and does not count it against the backend.

    This is the only exception a backend raises to say "the request is wrong": any other
    exception from a backend, a plain ``ValueError`` from a bug included, is a backend
    failure (502, fallback, breaker)."""


@dataclass
class GenerationParams:
    """Sampling settings, in OpenAI's vocabulary. ``temperature == 0`` means greedy.
    ``max_tokens`` None: up to the room the context leaves after the prompt (as vLLM does);
    a number larger than that room is cut to it too (``finish_reason`` ``length``)."""

    max_tokens: int | None = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # tool calling, OpenAI's fields as the client sent them (the router sets them only for
    # a backend with ``can_call_tools``); None: not sent
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # decode past the end-of-sequence token (vLLM's ``ignore_eos``; benchmarks that need a
    # fixed answer length); in-process backends and the engines' span decoder honour it
    ignore_eos: bool = False
    # each streamed token's log-probability (``StreamChunk.token_logprobs``) from a backend
    # that decodes token by token; off by default: it costs a pass over the vocabulary a step
    logprobs: bool = False
    # with ``logprobs``: also the k most likely tokens at each step and their log-probabilities
    # (``StreamChunk.top_logprobs``; OpenAI's completions ``logprobs: k``); 0: none
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")


FinishReason = Literal["stop", "length", "tool_calls", "error"]


@dataclass
class GenerationResult:
    """A whole generation. Token counts are in the backend's own tokenizer."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    # span decoding only (models.span.decoder): the gate, answer tokens per model, switches
    # and catch-up tokens, e.g. {"gate": "copy-2", "transformer": 12, "hybrid": 30,
    # "switches": 5, "catchup": 17}; None for a single backend
    span: dict[str, int | str] | None = None
    # the tool calls the model made (OpenAI's shape: id, type, function {name, arguments});
    # None: none (``finish_reason`` is "tool_calls" when there are)
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class StreamChunk:
    """One streamed piece of text; the last chunk carries ``finish_reason`` and counts.
    A chunk with ``tool_calls`` carries tool-call deltas instead of text (OpenAI's stream
    shape, index-keyed: ``[{"index": 0, "id", "type", "function": {"name", "arguments"}}]``
    first, then ``[{"index": 0, "function": {"arguments": PIECE}}]``), passed on as given."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # span decoding only: the models whose tokens make up ``text``, in order of appearance
    # (one role for nearly every chunk), and on the last chunk the totals (see
    # ``GenerationResult.span``); None for a single backend
    span_roles: tuple[str, ...] | None = None
    span: dict[str, int | str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    # the tokens decoded into this chunk (its text may lag behind them: held back while it
    # could begin a stop sequence or a character) and their log-probabilities (nats), from a
    # backend that decodes token by token (in-process); None when unknown
    token_ids: tuple[int, ...] | None = None
    token_logprobs: tuple[float, ...] | None = None
    # per token, the ``top_logprobs`` most likely tokens and the chosen one: {id: log-prob}
    top_logprobs: tuple[dict[int, float], ...] | None = None


@dataclass
class ScoreResult:
    """Per-token log-probabilities (nats, natural log) of a continuation given a prompt.

    ``logprobs[i]`` is log p(tokens[i] | prompt, tokens[:i]). ``loss`` is the mean negative
    log-probability over the continuation tokens (nats/token).
    """

    tokens: list[str]
    logprobs: list[float]
    token_ids: list[int] | None = None
    # the prompt's own tokens as scored (after the start token; cut from the left when the
    # whole exceeded the context) and log p(prompt[i] | prompt[:i]): the same forward pass
    # gives them for free (the prompt probe, classifiers/probe.py); None when unknown
    prompt_ids: list[int] | None = None
    prompt_logprobs: list[float] | None = None

    @property
    def loss(self) -> float:
        if not self.logprobs:
            return float("nan")
        return -sum(self.logprobs) / len(self.logprobs)


@dataclass
class PromptScore:
    """A prompt's own per-token log-probabilities (nats), from one prefill and no answer:
    ``logprobs[i]`` is log p(token i | the tokens before it), ``pieces[i]`` token i's text,
    ``ids`` the token ids when the backend knows them (in-process; None from an upstream,
    which sends text). A token without a log-probability (the first one an upstream echoes)
    is left out. The prompt probe (:mod:`classifiers.probe`) compares two backends' scores of
    the same prompt token by token."""

    pieces: list[str]
    logprobs: list[float]
    ids: list[int] | None = None


@dataclass(frozen=True)
class BackendInfo:
    """Facts a backend states about itself (shown by /v1/models and used by the cost model)."""

    name: str
    architecture: Architecture
    parameters: int | None = None
    layer_types: tuple[str, ...] = ()
    context_length: int | None = None
    location: str = ""  # a local path or an upstream URL


def plain_chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """The fallback chat rendering for tokenizers without a chat template."""
    parts = [f"{m.role.capitalize()}: {m.plain()}" for m in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"


def token_ids_refused(name: str) -> RequestError:
    """The error for a :class:`TokenIds` prompt sent to a backend without a tokenizer."""
    return RequestError(f"prompt: {name} takes text prompts, not token ids (token ids need a "
                        "backend with the model's tokenizer in-process)")


class BackendError(RuntimeError):
    """A backend failed to serve a request (the router may fall back to the other one)."""


class Backend(ABC):
    """Serve and score text. Subclasses implement the sync methods; the async ones wrap them.

    The contract (tests/models/test_registry.py checks every registered kind): ``info``,
    ``generate``, ``score`` (and ``stream``, ``score_batch``, ``close``, the async forms,
    which have defaults). Optional capabilities are declared here with the value that means
    "not available", so callers read them directly instead of probing:

    - ``context_length``: tokens the model attends over; None when unknown (an upstream);
    - ``tokenizer``: a Hugging Face tokenizer when the model runs in-process, else None;
    - ``prefix_id``: the start token the backend puts before a scored text, else None;
    - ``render(prompt)``: the text the model sees for a prompt (a conversation through the
      chat template; by default :func:`plain_chat_prompt`);
    - ``encode(text)``: token ids, or None without a tokenizer;
    - ``accepts_token_ids``: ``generate``/``stream`` take a :class:`TokenIds` prompt (an
      in-process model); others refuse one with a :class:`RequestError`;
    - ``can_call_tools``: the backend takes tool definitions (``GenerationParams.tools``)
      and answers with tool calls (an upstream); False: the router never sends it tools and
      renders a conversation's tool calls as text (:meth:`ChatMessage.plain`);
    - ``can_score_prompt`` / ``score_prompt(prompt)``: the prompt's own log-probabilities
      (:class:`PromptScore`) from one prefill, the prompt probe's input (a ``probe``
      profile asks both backends before it scores a request); False: ``score_prompt``
      raises :class:`RequestError` (the router then scores the request without the probe).
      In-process it is one forward over the ids generation would read; an upstream asks
      ``/completions`` with ``echo`` + ``logprobs`` (a text prompt) or ``/chat/completions``
      with vLLM's ``prompt_logprobs`` (a conversation).
    """

    context_length: int | None = None
    tokenizer: Any = None
    prefix_id: int | None = None
    can_score: bool = True  # False: score raises RequestError (the span decoder)
    can_score_prompt: bool = False
    can_call_tools: bool = False
    accepts_token_ids: bool = False

    def __init__(self, name: str, max_concurrency: int = 1) -> None:
        self.name = name
        # requests in flight at once; enforced by the router's pool (router/pool.py)
        self.max_concurrency = max_concurrency

    # --- facts ---------------------------------------------------------------------
    @abstractmethod
    def info(self) -> BackendInfo: ...

    def cost_model(self):  # -> models.cost.CostModel | None
        """The analytic cost model for this backend, or None when its config is unknown."""
        return None

    # --- sync primitives -----------------------------------------------------------
    @abstractmethod
    def generate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult: ...

    def stream(self, prompt: Prompt, params: GenerationParams) -> Iterator[StreamChunk]:
        """Default: one chunk holding the whole generation (its tool calls, if any, in a
        chunk before it)."""
        result = self.generate(prompt, params)
        if result.tool_calls:
            yield StreamChunk("", tool_calls=[{"index": i, **c}
                                              for i, c in enumerate(result.tool_calls)])
        yield StreamChunk(result.text, result.finish_reason, result.prompt_tokens,
                          result.completion_tokens)

    @abstractmethod
    def score(self, prompt: str, continuation: str) -> ScoreResult: ...

    def score_batch(self, pairs: Sequence[tuple[str, str]]) -> list[ScoreResult]:
        """Score many (prompt, continuation) pairs; backends batch where they can."""
        return [self.score(p, c) for p, c in pairs]

    def score_prompt(self, prompt: Prompt) -> PromptScore:
        """The prompt's own log-probabilities as this backend reads it for generation (see
        ``can_score_prompt``); by default not available."""
        raise RequestError(f"{self.name} cannot score a prompt on its own")

    def render(self, prompt: Prompt) -> str:
        """The text the model is given for ``prompt`` (a string as is)."""
        if isinstance(prompt, TokenIds):
            raise token_ids_refused(self.name)
        return prompt if isinstance(prompt, str) else plain_chat_prompt(prompt)

    def encode(self, text: str) -> list[int] | None:
        """Token ids of ``text`` (no special tokens), or None when the backend has no
        tokenizer the router can reach."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (HTTP clients, model memory)."""

    async def aclose(self) -> None:
        """Release resources from the event loop (default: :meth:`close`); backends with
        async clients override it."""
        self.close()

    async def aprobe(self) -> str | None:
        """Why this backend cannot be reached now, or None (default: always reachable; an
        upstream asks its server). Cheap: the router calls it at start-up and from
        ``/ready`` while a backend is unreachable."""
        return None

    # --- async wrappers (never block the event loop) ------------------------------
    async def agenerate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        return await asyncio.to_thread(self.generate, prompt, params)

    async def ascore(self, prompt: str, continuation: str) -> ScoreResult:
        return await asyncio.to_thread(self.score, prompt, continuation)

    async def ascore_prompt(self, prompt: Prompt) -> PromptScore:
        return await asyncio.to_thread(self.score_prompt, prompt)

    async def astream(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        """Run :meth:`stream` in a worker thread and hand chunks to the loop via a queue.
        When the consumer stops early (a client that disconnected), the worker stops at its
        next chunk, so a backend that yields once per decode step (the in-process one does,
        empty chunks included) stops within one step instead of finishing the answer."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        done = object()
        stop = threading.Event()

        def produce() -> None:
            gen = self.stream(prompt, params)
            try:
                for chunk in gen:
                    if stop.is_set():
                        if isinstance(gen, Generator):  # the contract allows any iterator
                            gen.close()  # GeneratorExit at the backend's yield: its cleanup runs
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        task = loop.run_in_executor(None, produce)
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, StreamChunk)
                yield item
        finally:
            stop.set()
            await task
