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

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.base import ChatMessage

log = logging.getLogger(__name__)


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


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

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
    profile's threshold for this request."""

    model_config = ConfigDict(extra="forbid")
    threshold: float | None = Field(None, ge=0.0, le=1.01)


class _Sampling(_Open):
    # shared tail of both request kinds, in OpenAI's order
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = None
    seed: int | None = None
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
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    model: str
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)

    def chat_messages(self) -> list[ChatMessage]:
        return [ChatMessage(m.role, m.text()) for m in self.messages]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[str]
    best_of: int | None = None
    echo: bool = False
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1)
    suffix: str | None = None

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


def model_card(name: str, owned_by: str, **meta: Any) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": owned_by} | meta
