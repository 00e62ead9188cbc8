"""OpenAI's wire format, as the upstream backend speaks it: a conversation turn as a request
message, finish reasons, an error body's message, the events of a streamed answer
(:class:`SSEParser`) and the continuation's tokens in an echoed, scored completion
(:func:`select_continuation`). No transport here: :mod:`models.upstream` sends and reads.
"""

from __future__ import annotations

import json
from typing import Any

from models.base import BackendError, ChatMessage, FinishReason, ScoreResult, StreamChunk


def finish_reason(reason: object) -> FinishReason:
    if reason == "length":
        return "length"
    return "tool_calls" if reason == "tool_calls" else "stop"


def wire_message(m: ChatMessage) -> dict[str, Any]:
    """A conversation turn with tool calling fields as OpenAI's message: role, content
    (null for an assistant turn that only calls tools), ``tool_calls``, ``tool_call_id`` and
    a tool turn's ``name`` (a turn without them is ``{"role", "content"}``, as before)."""
    content = (m.content or None) if m.tool_calls else m.content
    out: dict[str, Any] = {"role": m.role, "content": content}
    if m.tool_calls is not None:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            out["name"] = m.name
    return out


def error_text(content: bytes) -> str:
    try:
        err = json.loads(content).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err:
            return str(err)
    except (ValueError, AttributeError):
        pass
    return content[:300].decode("utf-8", "replace")


def select_continuation(text: str, prompt_len: int, end: int, tokens: list[str],
                        logprobs: list[float | None], offsets: list[int]) -> ScoreResult:
    """Keep the echoed tokens that cover characters ``[prompt_len, end)`` of ``text``.

    A token straddling the prompt/continuation boundary counts as continuation (it predicts
    continuation characters). Raises :class:`BackendError` when a kept token has no
    log-probability (the first token of the text: give a non-empty prompt).
    """
    del text  # offsets index into it; kept in the signature for clarity
    keep_t: list[str] = []
    keep_l: list[float] = []
    for i, (tok, lp, off) in enumerate(zip(tokens, logprobs, offsets, strict=True)):
        tok_end = offsets[i + 1] if i + 1 < len(offsets) else off + len(tok)
        if off >= end or tok_end <= prompt_len:
            continue
        if lp is None:
            raise BackendError("upstream gave no log-probability for the first continuation "
                               "token (the text's first token); score with a non-empty prompt")
        keep_t.append(tok)
        keep_l.append(float(lp))
    return ScoreResult(keep_t, keep_l)


class SSEParser:
    """Turns an OpenAI SSE stream, line by line, into :class:`StreamChunk` objects.

    ``feed(line)`` returns the chunks that line yields; ``done`` is set by ``data: [DONE]``;
    ``final()`` is the last chunk, with the finish reason and the usage counts if sent.
    """

    def __init__(self, name: str, chat: bool, tools: bool = False) -> None:
        self.name = name
        self.chat = chat
        self.tools = tools  # the request sent tools: read deltas' tool_calls too
        self.done = False
        self.finish: FinishReason = "stop"
        self.usage: dict = {}

    def feed(self, line: str) -> list[StreamChunk]:
        if self.done or not line.startswith("data:"):
            return []
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return []
        data = json.loads(payload)
        if "error" in data:
            raise BackendError(f"{self.name}: upstream stream error: {data['error']}")
        self.usage = data.get("usage") or self.usage
        out = []
        for choice in data.get("choices") or []:
            piece = ((choice.get("delta") or {}).get("content") if self.chat
                     else choice.get("text"))
            if choice.get("finish_reason"):
                self.finish = finish_reason(choice["finish_reason"])
            if piece:
                out.append(StreamChunk(piece))
            if self.tools:
                calls = (choice.get("delta") or {}).get("tool_calls")
                if calls:
                    out.append(StreamChunk("", tool_calls=calls))
        return out

    def final(self) -> StreamChunk:
        return StreamChunk("", self.finish, self.usage.get("prompt_tokens"),
                           self.usage.get("completion_tokens"))
