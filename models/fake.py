"""A fake backend for tests and benchmarks: instant, deterministic, scriptable.

Replies are taken from a queue you fill with :meth:`FakeBackend.enqueue`; when it is empty
the reply is ``default_reply``. :meth:`FakeBackend.fail` makes the next calls raise, and
``delay_s`` sleeps before answering (to test timeouts and concurrency limits).

Tool calling: given ``tool_calls`` (each ``{"name", "arguments"}`` or OpenAI's whole call),
the backend ``can_call_tools`` and answers a request that sends tools (``tool_choice`` not
``"none"``) whose last turn is not a tool result with those calls (``finish_reason``
``tool_calls``; streamed as OpenAI streams them: a call's id and name, then its arguments
piece by piece); any other request gets a text reply. ``params`` records every generation's
:class:`GenerationParams`.

"Tokens" are whitespace-led words (``re.findall(r"\\s*\\S+|\\s+$")``), so joining a text's
tokens gives it back exactly and character offsets are easy to check.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from models.base import (
    Architecture,
    Backend,
    BackendError,
    BackendInfo,
    FinishReason,
    GenerationParams,
    GenerationResult,
    Prompt,
    PromptScore,
    ScoreResult,
    StreamChunk,
    TokenIds,
    stated_architecture,
    token_ids_refused,
)

_TOKEN = re.compile(r"\s*\S+|\s+$")


def fake_tokens(text: str) -> list[str]:
    """Split ``text`` into whitespace-led words; ``"".join(fake_tokens(t)) == t``."""
    return _TOKEN.findall(text)


def fake_logprob(token: str) -> float:
    """A deterministic log-probability (nats) for a token: longer tokens are less likely."""
    return -0.1 * len(token.strip()) - 0.05


COPY_LOGPROB = -0.01  # a fake transformer's log-probability of a token it has seen before


def fake_prompt_logprobs(tokens: list[str], architecture: str) -> list[float]:
    """Deterministic prompt log-probabilities, the study's pattern in miniature: every
    backend reads a token as :func:`fake_logprob` says, except that a transformer reads a
    token already seen earlier in the prompt at :data:`COPY_LOGPROB` (it copies), so a
    repetitive prompt gives the transformer the lower prompt loss and the probe can tell."""
    seen: set[str] = set()
    out = []
    for t in tokens:
        key = t.strip()
        out.append(COPY_LOGPROB if architecture == "transformer" and key in seen
                   else fake_logprob(t))
        seen.add(key)
    return out


class FakeBackend(Backend):
    """Answers from a queue of scripted replies, instantly unless ``delay_s`` is set."""

    can_score_prompt = True

    def __init__(self, name: str = "fake", architecture: Architecture = "other",
                 default_reply: str = "Hello from the fake backend.", delay_s: float = 0.0,
                 max_concurrency: int = 64,
                 tool_calls: list[dict[str, Any]] | None = None) -> None:
        super().__init__(name, max_concurrency)
        self.architecture = architecture
        self.default_reply = default_reply
        self.delay_s = delay_s
        self.tool_calls = None if tool_calls is None else fake_tool_calls(tool_calls)
        self.can_call_tools = tool_calls is not None
        self.calls: list[tuple[str, Prompt]] = []  # (method, prompt), for assertions
        self.params: list[GenerationParams] = []  # each generation's params, in order
        self._replies: deque[str] = deque()
        self._failures = 0
        self._mutex = threading.Lock()

    def enqueue(self, *replies: str) -> FakeBackend:
        """Queue replies for the next calls, in order."""
        self._replies.extend(replies)
        return self

    def fail(self, times: int = 1) -> FakeBackend:
        """Make the next ``times`` calls raise :class:`BackendError`."""
        self._failures += times
        return self

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.architecture, parameters=0, location="fake")

    def _next(self, method: str, prompt: Prompt, take_reply: bool = True) -> str:
        with self._mutex:
            self.calls.append((method, prompt))
            failing = self._failures > 0
            if failing:
                self._failures -= 1
            reply = self.default_reply
            if take_reply and self._replies:
                reply = self._replies.popleft()
        if self.delay_s:
            time.sleep(self.delay_s)
        if failing:
            raise BackendError(f"{self.name}: scripted failure")
        return reply

    @staticmethod
    def _prompt_tokens(prompt: Prompt) -> int:
        if isinstance(prompt, TokenIds):
            raise token_ids_refused("the fake backend")
        text = prompt if isinstance(prompt, str) else "\n".join(m.content for m in prompt)
        return len(fake_tokens(text))

    @staticmethod
    def _cut(reply: str, params: GenerationParams) -> tuple[list[str], FinishReason]:
        """The reply's tokens after stop sequences and max_tokens, and the finish reason."""
        for s in params.stop:
            if s and s in reply:
                return fake_tokens(reply[: reply.index(s)]), "stop"
        toks = fake_tokens(reply)
        if params.max_tokens is not None and len(toks) > params.max_tokens:
            return toks[: params.max_tokens], "length"
        return toks, "stop"

    def _calls_tools(self, prompt: Prompt, params: GenerationParams) -> bool:
        """Answer with the scripted tool calls: tools sent, not refused by ``tool_choice``,
        and the last turn is not a tool's result."""
        return (self.tool_calls is not None and bool(params.tools)
                and params.tool_choice != "none" and not isinstance(prompt, str | TokenIds)
                and bool(prompt) and prompt[-1].role != "tool")

    def generate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        self.params.append(params)
        if self._calls_tools(prompt, params):
            self._next("generate", prompt, take_reply=False)
            calls = copy.deepcopy(self.tool_calls) or []
            return GenerationResult("", self._prompt_tokens(prompt), _call_tokens(calls),
                                    "tool_calls", tool_calls=calls)
        toks, finish = self._cut(self._next("generate", prompt), params)
        return GenerationResult("".join(toks), self._prompt_tokens(prompt), len(toks), finish)

    def stream(self, prompt: Prompt, params: GenerationParams) -> Iterator[StreamChunk]:
        self.params.append(params)
        if self._calls_tools(prompt, params):
            self._next("stream", prompt, take_reply=False)
            calls = copy.deepcopy(self.tool_calls) or []
            for i, call in enumerate(calls):
                fn = call["function"]
                yield StreamChunk("", tool_calls=[{
                    "index": i, "id": call["id"], "type": "function",
                    "function": {"name": fn["name"], "arguments": ""}}])
                for piece in fake_tokens(fn["arguments"]):
                    yield StreamChunk("", tool_calls=[{"index": i,
                                                       "function": {"arguments": piece}}])
            yield StreamChunk("", "tool_calls", self._prompt_tokens(prompt), _call_tokens(calls))
            return
        toks, finish = self._cut(self._next("stream", prompt), params)
        for t in toks:
            yield StreamChunk(t)
        yield StreamChunk("", finish, self._prompt_tokens(prompt), len(toks))

    def score(self, prompt: str, continuation: str) -> ScoreResult:
        self._next("score", prompt + continuation, take_reply=False)
        toks = fake_tokens(continuation)
        return ScoreResult(toks, [fake_logprob(t) for t in toks])

    def score_prompt(self, prompt: Prompt) -> PromptScore:
        """:func:`fake_prompt_logprobs` of the prompt's tokens (a conversation's turns joined
        by newlines, as :meth:`_prompt_tokens` counts them); ``fail`` and ``delay_s`` apply."""
        self._next("score_prompt", prompt, take_reply=False)
        if isinstance(prompt, TokenIds):
            raise token_ids_refused("the fake backend")
        text = prompt if isinstance(prompt, str) else "\n".join(m.content for m in prompt)
        toks = fake_tokens(text)
        return PromptScore(toks, fake_prompt_logprobs(toks, self.architecture))


def fake_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls in OpenAI's whole shape (``{"id", "type": "function", "function": {"name",
    "arguments"}}``, ``arguments`` a JSON string) from that shape or ``{"name", "arguments"}``
    (``arguments`` an object or a string); ids ``call_fake_0``, ``call_fake_1``... unless
    given."""
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function", call)
        args = fn.get("arguments", "{}")
        out.append({"id": call.get("id", f"call_fake_{i}"), "type": "function",
                    "function": {"name": str(fn["name"]),
                                 "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return out


def _call_tokens(calls: list[dict[str, Any]]) -> int:
    return sum(len(fake_tokens(c["function"]["arguments"])) + 1 for c in calls)


def build(cfg, role: str | None = None, torch_threads: int | None = None) -> FakeBackend:
    """The registry's factory for kind ``fake`` (models/registry.py); ``call_tools: false``
    turns scripted tool calls off."""
    calls = cfg.fake_tool_calls if cfg.call_tools is not False else None
    return FakeBackend(cfg.name, stated_architecture(role), default_reply=cfg.fake_reply,
                       delay_s=cfg.fake_delay_s, max_concurrency=cfg.max_concurrency or 64,
                       tool_calls=calls)
