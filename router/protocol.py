"""OpenAI protocol models (pydantic) for chat completions, completions and models.

Request fields follow the order of OpenAI's API reference. Fields ArchRoute does not act on
are accepted and ignored (sampling penalties, logit_bias, tools...); fields nobody knows are
accepted too and their *names* logged. The ArchRoute extension is fenced at the end of each
model and described there.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.base import ChatMessage

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


class _Open(BaseModel):
    """Accepts unknown fields (OpenAI adds them often); :meth:`log_unknown` names them."""

    model_config = ConfigDict(extra="allow")

    def log_unknown(self, where: str) -> None:
        if self.model_extra:
            log.info("%s: ignoring unknown fields %s", where, sorted(self.model_extra))


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

    @field_validator("content", "name")
    @classmethod
    def _unicode(cls, v, info):
        return no_surrogates(v, info.field_name)

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


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    model: str = Field(max_length=MAX_MODEL_CHARS)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return no_surrogates(v, "model")

    def chat_messages(self) -> list[ChatMessage]:
        return [ChatMessage(m.role, m.text()) for m in self.messages]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    model: str = Field(max_length=MAX_MODEL_CHARS)
    prompt: str | list[str]
    best_of: int | None = Field(None, ge=1, le=20)
    echo: bool = False
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)
    suffix: str | None = None

    @field_validator("model", "prompt", "suffix")
    @classmethod
    def _unicode(cls, v, info):
        return no_surrogates(v, info.field_name)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("prompt: send one prompt per request (a list of one string)")
            return self.prompt[0]
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
                  completion_tokens: int, extra: dict[str, Any] | None = None) -> dict:
    """``choices``: (text, finish_reason) per choice."""
    out = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
           "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                        "logprobs": None, "finish_reason": fin}
                       for i, (text, fin) in enumerate(choices)],
           "usage": usage(prompt_tokens, completion_tokens)}
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


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, str],
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
