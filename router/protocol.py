"""OpenAI protocol models (pydantic) for chat completions, completions and models.

Request fields follow the order of OpenAI's API reference. Fields ArchRoute does not act on
are accepted and ignored (sampling penalties, logit_bias...); fields nobody knows are
accepted too and their *names* logged (at most 16, each cut to 64 characters). Tool calling fields (``tools``, ``tool_choice``,
``parallel_tool_calls``, the legacy ``functions`` / ``function_call``; messages'
``tool_calls`` and ``tool_call_id``) are kept as sent:
:meth:`ChatCompletionRequest.tool_fields` and :meth:`ChatCompletionRequest.chat_messages`
hand them on. The ArchRoute extension is fenced at the end of each model and described
there.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from models.base import ChatMessage, GenerationParams, RequestError, TokenIds

log = logging.getLogger(__name__)

# Bounds every numeric field gets, so no value can overflow what reads it (a JSON integer
# has no size limit): a value outside is a 400 naming the field.
MAX_TOKENS = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_MODEL_CHARS = 256
# Sampling values so small they underflow are the greedy choice they stand for: a temperature
# below MIN_TEMPERATURE or a top_p below MIN_TOP_P (a nucleus of one token) decodes greedily.
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-6


def no_surrogates(value: Any, field: str) -> Any:
    """``value`` unchanged, or ValueError when a string in it holds an unpaired UTF-16
    surrogate (valid JSON, ``"\\ud800"``, but not text any tokenizer or UTF-8 can carry)."""
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"{field} holds an unpaired UTF-16 surrogate "
                                 f"(U+{ord(v[exc.start]):04X} at character {exc.start}); "
                                 "send valid Unicode text") from None
    return value


def no_surrogates_json(value: Any, field: str) -> Any:
    """``value`` (JSON: tool definitions, tool calls) unchanged, or ValueError when a string
    in it, a key included, holds an unpaired UTF-16 surrogate (see :func:`no_surrogates`)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} holds an unpaired UTF-16 surrogate; send valid Unicode "
                         "text") from None
    return value


# unknown field names in the log: at most this many, each cut to this many characters (a
# client chooses them: a 100 kB name must not become a 100 kB log line)
MAX_LOGGED_FIELDS = 16
MAX_LOGGED_NAME_CHARS = 64


def loggable_name(name: str) -> str:
    """A client-chosen name as it may appear in a log line: ``repr`` (no control characters
    reach the log), cut to :data:`MAX_LOGGED_NAME_CHARS` with the length it had."""
    if len(name) <= MAX_LOGGED_NAME_CHARS:
        return repr(name)
    return f"{name[:MAX_LOGGED_NAME_CHARS]!r}... ({len(name)} chars)"


class _Open(BaseModel):
    """Accepts unknown fields (OpenAI adds them often); :meth:`log_unknown` names them."""

    model_config = ConfigDict(extra="allow")

    def log_unknown(self, where: str) -> None:
        if self.model_extra:
            names = sorted(self.model_extra)
            shown = ", ".join(loggable_name(n) for n in names[:MAX_LOGGED_FIELDS])
            more = len(names) - MAX_LOGGED_FIELDS
            log.info("%s: ignoring unknown fields [%s]%s", where, shown,
                     f" and {more} more" if more > 0 else "")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @field_validator("text")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return no_surrogates(v, "text")


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # tool calling: an assistant turn's calls (OpenAI's shape, handed on as sent) and the
    # call a tool turn answers
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content", "name", "tool_call_id")
    @classmethod
    def _unicode(cls, v, info):
        return no_surrogates(v, info.field_name)

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """Each call needs ``function.name`` (a string) and, if given, ``function.arguments``
        (a JSON string, or an object): an in-process backend renders them as text."""
        for call in v or ():
            fn = call.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError("tool_calls: each call needs function.name (a string)")
            args = fn.get("arguments")
            if args is not None and not isinstance(args, str | dict):
                raise ValueError("tool_calls: function.arguments must be a JSON string")
        return no_surrogates_json(v, "tool_calls")

    def text(self) -> str:
        """The message's text; multi-part content is joined, non-text parts are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ValueError(f"messages: content part of type {p.type!r} is not supported "
                                 "(text only)")
            parts.append(p.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ArchRouteOptions(BaseModel):
    """ArchRoute extension (request): ``{"archroute": {"threshold": 0.4}}`` overrides the
    profile's threshold for this request; ``"explain": true`` adds ``reasons`` (the features
    behind the score, in words) to the response's ``archroute`` object; ``"gate": "copy-3"``
    picks the gate of a span profile (``policy: span``) for this request (a gate of the
    registry, ``models.span.gates.GATES``)."""

    model_config = ConfigDict(extra="forbid")
    threshold: float | None = Field(None, ge=0.0, le=1.01)
    explain: bool = False
    gate: str | None = Field(None, max_length=64)


class _Sampling(_Open):
    # shared tail of both request kinds, in OpenAI's order
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # --- ArchRoute extension --------------------------------------------------------
    archroute: ArchRouteOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return no_surrogates(v, "stop")

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        return no_surrogates(v, "user")

    @model_validator(mode="after")
    def _underflow(self):
        """Sampling values that underflow decode greedily (see :data:`MIN_TEMPERATURE`)."""
        if self.temperature < MIN_TEMPERATURE or self.top_p < MIN_TOP_P:
            self.temperature, self.top_p = 0.0, 1.0
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# a request's tool calling fields, in the order messages name them
TOOL_FIELDS = ("tools", "functions", "tool_choice", "function_call", "parallel_tool_calls")


@dataclass(frozen=True)
class ToolFields:
    """A request's tool calling fields: ``sent`` names the ones it set (for warnings and
    errors); ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` are what a backend that
    calls tools is given (legacy ``functions`` / ``function_call`` mapped to them; all None
    for a completion request, which takes no tools)."""

    sent: tuple[str, ...]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def passable(self) -> bool:
        """Anything a backend could be given (a completion request's never is)."""
        return (self.tools is not None or self.tool_choice is not None
                or self.parallel_tool_calls is not None)

    def apply(self, params: GenerationParams) -> GenerationParams:
        params.tools, params.tool_choice = self.tools, self.tool_choice
        params.parallel_tool_calls = self.parallel_tool_calls
        return params


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    model: str = Field(max_length=MAX_MODEL_CHARS)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    # tool calling (OpenAI's shape; handed on as sent to a backend that calls tools, see
    # tool_fields); functions / function_call: the legacy form, mapped to tools / tool_choice
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return no_surrogates(v, "model")

    @field_validator("tools", "tool_choice", "functions", "function_call")
    @classmethod
    def _tool_unicode(cls, v, info):
        return no_surrogates_json(v, info.field_name)

    # one check for every endpoint that takes this body (chat, /v1/route, serve-model): the
    # legacy form and the current one at once is a 400 naming the legacy field
    @field_validator("functions")
    @classmethod
    def _functions_or_tools(cls, v, info):
        if v and info.data.get("tools"):
            raise PydanticCustomError("tool_fields", "send tools or the legacy functions, "
                                      "not both")
        return v

    @field_validator("function_call")
    @classmethod
    def _function_call_or_tool_choice(cls, v, info):
        if v is not None and info.data.get("tool_choice") is not None:
            raise PydanticCustomError("tool_fields", "send tool_choice or the legacy "
                                      "function_call, not both")
        return v

    def chat_messages(self) -> list[ChatMessage]:
        return [ChatMessage(m.role, m.text(), m.tool_calls, m.tool_call_id, m.name)
                for m in self.messages]

    def tool_fields(self) -> ToolFields | None:
        """None when the request sets no tool field (an empty list counts as not set), else
        what it sent, with the legacy ``functions`` (``[f]`` -> ``[{"type": "function",
        "function": f}]``) and ``function_call`` (``{"name": N}`` -> ``{"type": "function",
        "function": {"name": N}}``; ``"auto"`` / ``"none"`` as they are) mapped to ``tools``
        and ``tool_choice``. (Both forms at once never get here: validation refuses them.)"""
        if (not self.tools and not self.functions and self.tool_choice is None
                and self.function_call is None and self.parallel_tool_calls is None):
            return None
        sent = tuple(k for k in TOOL_FIELDS
                     if getattr(self, k) is not None and getattr(self, k) != [])
        if not sent:
            return None
        tools, choice = self.tools or None, self.tool_choice
        if self.functions:
            tools = [{"type": "function", "function": f} for f in self.functions]
        if self.function_call is not None:
            fc = self.function_call
            choice = ({"type": "function", "function": {"name": fc.get("name")}}
                      if isinstance(fc, dict) else fc)
        return ToolFields(sent, tools, choice, self.parallel_tool_calls)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    model: str = Field(max_length=MAX_MODEL_CHARS)
    # text, a list of one text, or token ids (read as given: serve-model and engines only)
    prompt: str | list[str] | list[int]
    best_of: int | None = Field(None, ge=1, le=20)
    echo: bool = False
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)
    suffix: str | None = None
    # vLLM's extensions: with ``stream`` and ``logprobs``, each token as "token_id:N"; decode
    # past the end-of-sequence token (serve-model honours both; the router ignores them)
    return_tokens_as_token_ids: bool = False
    ignore_eos: bool = False

    @field_validator("model", "prompt", "suffix")
    @classmethod
    def _unicode(cls, v, info):
        return no_surrogates(v, info.field_name)

    def token_prompt(self) -> TokenIds | None:
        """The prompt as :class:`TokenIds` when it was sent as token ids, else None."""
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            return TokenIds(tuple(p))  # type: ignore[arg-type]
        return None

    def prompt_text(self) -> str:
        if self.token_prompt() is not None:
            raise RequestError("prompt: token ids are read by `archroute serve-model` and by "
                               "engines, not by the router, which routes on the text: send "
                               "the prompt as text")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("prompt: send one prompt per request (a list of one string)")
            return str(self.prompt[0])
        return self.prompt

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# --- responses (plain dicts in OpenAI's shape; built in one place) ---------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, choices: Sequence[tuple[str, str]], prompt_tokens: int,
                  completion_tokens: int, extra: dict[str, Any] | None = None,
                  tool_calls: Sequence[list[dict[str, Any]] | None] | None = None) -> dict:
    """``choices``: (text, finish_reason) per choice; ``tool_calls``: each choice's tool
    calls (None: none), set as ``message.tool_calls`` (``content`` null when empty, as
    OpenAI sends it)."""
    items: list[dict[str, Any]] = [{"index": i, "message": {"role": "assistant", "content": text},
                                    "logprobs": None, "finish_reason": fin}
                                   for i, (text, fin) in enumerate(choices)]
    out = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
           "choices": items, "usage": usage(prompt_tokens, completion_tokens)}
    if tool_calls is not None:
        for choice, calls in zip(items, tool_calls, strict=True):
            if calls:
                message = choice["message"]
                message["content"] = message["content"] or None
                message["tool_calls"] = calls
    return out | (extra or {})


def completion_response(rid: str, model: str, choices: Sequence[tuple[str, str]],
                        prompt_tokens: int, completion_tokens: int,
                        logprobs: list[dict | None] | None = None,
                        extra: dict[str, Any] | None = None) -> dict:
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": i, "text": text,
                        "logprobs": logprobs[i] if logprobs else None, "finish_reason": fin}
                       for i, (text, fin) in enumerate(choices)],
           "usage": usage(prompt_tokens, completion_tokens)}
    return out | (extra or {})


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any],
               finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, chat: bool, prompt_tokens: int,
                completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_card(name: str, owned_by: str, created: int = 0, **meta: Any) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by} | meta
