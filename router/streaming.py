"""Server-sent events in OpenAI's shape, shared by the router and ``serve-model``.

The stream always ends with ``data: [DONE]``; a backend failure after the first byte becomes
one error event (OpenAI's envelope) before it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from router import protocol as P
from router.errors import sse_error
from router.pool import BackendStream

log = logging.getLogger(__name__)

# on_end(status, error, prompt_tokens, completion_tokens), called once when the stream ends
OnEnd = Callable[[int, str | None, int | None, int | None], None]
# on_span(totals), called before on_end when the last chunk carried span totals
OnSpan = Callable[[dict], None]


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def sse_events(stream: BackendStream, *, rid: str, model: str, chat: bool,
                     include_usage: bool = False, echo: str = "", ext: dict | None = None,
                     on_end: OnEnd | None = None, on_span: OnSpan | None = None,
                     token_ids: bool = False) -> AsyncIterator[str]:
    """Chunks of ``stream`` as SSE lines. ``echo`` is sent first (completions with echo);
    ``ext`` (the ArchRoute decision) rides on the first event, and its ``backend`` on every
    later one (``archroute.backend``) and in the usage object (``usage.archroute_backend``).
    Span decoding adds ``archroute.span_model`` to an event whose text one model produced
    and the totals (``archroute.span``) to the event with ``finish_reason``. A chunk's tool
    calls become an event with ``delta.tool_calls`` (as the backend gave them).
    ``token_ids`` (completions; vLLM's ``return_tokens_as_token_ids`` with ``logprobs``):
    every chunk that carries tokens becomes an event, its text empty while the text is held
    back, with ``logprobs.tokens`` = ``["token_id:N", ...]`` and their log-probabilities."""
    created = int(time.time())
    tag = {"backend": ext["backend"]} if ext is not None else None

    def piece(text: str, finish: str | None = None, **span: object) -> dict:
        if chat:
            out = P.chat_chunk(rid, model, created, {"content": text} if text else {}, finish)
        else:
            out = P.completion_chunk(rid, model, created, text, finish)
        if tag is not None:
            out["archroute"] = tag | {k: v for k, v in span.items() if v is not None}
        return out

    status, error = 200, None
    n_prompt: int | None = None
    n_completion: int | None = None
    totals: dict | None = None
    sent = len(echo)  # characters of text sent so far (token_ids' text offsets)
    try:
        first = (P.chat_chunk(rid, model, created, {"role": "assistant", "content": ""})
                 if chat else piece(echo))
        if ext is not None:
            first["archroute"] = ext
        yield event(first)
        finish = "stop"
        async for chunk in stream:
            if token_ids and not chat and chunk.token_ids:
                out = piece(chunk.text)
                toks = [f"token_id:{t}" for t in chunk.token_ids]
                lps = list(chunk.token_logprobs or [None] * len(toks))
                tops = ([{f"token_id:{i}": lp for i, lp in d.items()} for d in chunk.top_logprobs]
                        if chunk.top_logprobs else [{t: lp} for t, lp in zip(toks, lps, strict=True)])
                out["choices"][0]["logprobs"] = {
                    "tokens": toks, "token_logprobs": lps, "top_logprobs": tops,
                    "text_offset": [sent] * len(toks)}
                sent += len(chunk.text)
                yield event(out)
            elif chunk.text:
                roles = chunk.span_roles
                yield event(piece(chunk.text, span_model=roles[0] if roles and len(roles) == 1
                                  else None))
            elif chat and chunk.tool_calls:
                calls = P.chat_chunk(rid, model, created, {"tool_calls": chunk.tool_calls})
                if tag is not None:
                    calls["archroute"] = tag
                yield event(calls)
            if chunk.finish_reason:
                finish = chunk.finish_reason
                n_prompt, n_completion = chunk.prompt_tokens, chunk.completion_tokens
                totals = chunk.span
        if totals is not None and on_span is not None:
            on_span(totals)
        yield event(piece("", finish, span=totals))
        if include_usage:
            last = P.usage_chunk(rid, model, created, chat, n_prompt or 0, n_completion or 0)
            if tag is not None:
                last["archroute"] = tag
                last["usage"]["archroute_backend"] = tag["backend"]
            yield event(last)
    except asyncio.CancelledError:  # the client went away
        status, error = 499, "client disconnected"
        raise
    except Exception as exc:  # noqa: BLE001 - becomes an error event, then [DONE]
        log.warning("stream from %s failed: %s: %s", stream.slot.name, type(exc).__name__, exc)
        error = str(exc) or type(exc).__name__
        yield sse_error(exc)
    finally:
        await stream.aclose()
        if on_end is not None:
            on_end(status, error, n_prompt, n_completion)
    yield "data: [DONE]\n\n"
