"""A backend that is any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, or
``archroute serve-model``), spoken to over HTTP with httpx.

A completion prompt (``str``) goes to ``/completions``, a conversation to
``/chat/completions``. ``score`` uses ``/completions`` with ``echo: true, logprobs: 1,
max_tokens: 1``: the server returns the log-probability of every prompt token (vLLM does;
the first token's is null), and the continuation's tokens are cut out by character offset.

Tool calling: the backend ``can_call_tools`` (unless built with ``call_tools=False``):
``GenerationParams.tools`` / ``tool_choice`` / ``parallel_tool_calls`` go into the chat body,
a conversation's ``tool_calls`` / ``tool_call_id`` (and a tool turn's ``name``) into its
messages, and the answer's ``message.tool_calls`` (streamed: ``delta.tool_calls``, as the
upstream sends them) come back with ``finish_reason`` ``tool_calls``. An answer's tool calls
are read only when the request sent tools.

Every failure becomes a :class:`~models.base.BackendError` (timeouts an
:class:`UpstreamTimeoutError`, HTTP errors an :class:`UpstreamStatusError`), so the router can
fall back. The async methods are native asyncio, never a thread.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from models import http1
from models.base import (
    Architecture,
    Backend,
    BackendError,
    BackendInfo,
    ChatMessage,
    FinishReason,
    GenerationParams,
    GenerationResult,
    Prompt,
    RequestError,
    ScoreResult,
    StreamChunk,
    TokenIds,
    stated_architecture,
)

KEEPALIVE_EXPIRY_S = 4.0  # idle upstream connections are dropped after this


class UpstreamTimeoutError(BackendError, TimeoutError):
    """The upstream did not answer (or stopped streaming) within the timeout."""


class UpstreamStatusError(BackendError):
    """The upstream answered with an HTTP error; ``status_code`` is its status."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class UpstreamRequestError(UpstreamStatusError, RequestError):
    """The upstream refused the request itself (HTTP 400/413/422, e.g. longer than its
    context): the request's fault, so the router answers 400 and does not fall back."""


def _finish(reason: object) -> FinishReason:
    if reason == "length":
        return "length"
    return "tool_calls" if reason == "tool_calls" else "stop"


def _message(m: ChatMessage) -> dict[str, Any]:
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


def _error_text(resp: httpx.Response | http1.Response) -> str:
    try:
        err = json.loads(resp.content).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err:
            return str(err)
    except (ValueError, AttributeError):
        pass
    return resp.content[:300].decode("utf-8", "replace")


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
                self.finish = _finish(choice["finish_reason"])
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


class OpenAIUpstreamBackend(Backend):
    """An OpenAI-compatible server at ``base_url`` (including ``/v1``), serving ``model``.

    ``timeout`` (s) bounds a whole non-streamed call and each gap between streamed chunks;
    ``connect_timeout`` (s) bounds connecting. ``architecture`` is what the operator states
    about the model (the server does not say).
    """

    def __init__(self, name: str, base_url: str, model: str, api_key: str | None = None,
                 architecture: Architecture = "other", timeout: float = 60.0,
                 connect_timeout: float = 5.0, max_concurrency: int = 64,
                 call_tools: bool = True) -> None:
        super().__init__(name, max_concurrency)
        # False: the server takes no tools (e.g. vLLM without --enable-auto-tool-choice);
        # the router then drops a request's tools for it (or refuses them, `tools: error`)
        self.can_call_tools = call_tools
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.architecture = architecture
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._api_key = api_key
        self._client: httpx.Client | None = None
        self._pool: http1.HTTP1Pool | None = None

    # --- plumbing ------------------------------------------------------------------
    def _client_args(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        # idle connections are dropped after 4 s, before a server's usual 5 s keep-alive
        # closes them under us (no requests racing a close, no CLOSE-WAIT sockets piling up)
        limits = httpx.Limits(max_connections=self.max_concurrency,
                              max_keepalive_connections=self.max_concurrency,
                              keepalive_expiry=KEEPALIVE_EXPIRY_S)
        return {"base_url": self.base_url, "headers": headers, "limits": limits,
                "timeout": httpx.Timeout(self.timeout, connect=self.connect_timeout)}

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(**self._client_args())
        return self._client

    @property
    def pool(self) -> http1.HTTP1Pool:
        """The async connection pool (made on first use, inside the serving event loop)."""
        if self._pool is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._pool = http1.HTTP1Pool(self.base_url, headers, self.max_concurrency,
                                         KEEPALIVE_EXPIRY_S, self.connect_timeout, self.timeout)
        return self._pool

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        self.close()
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.architecture, location=f"{self.base_url} ({self.model})")

    def _body(self, prompt: Prompt, params: GenerationParams, stream: bool) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": self.model, "temperature": params.temperature,
                                "top_p": params.top_p}
        if params.max_tokens is not None:  # absent: the engine's own default (vLLM: the room left)
            body["max_tokens"] = params.max_tokens
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.ignore_eos:  # vLLM's extension (serve-model has it too)
            body["ignore_eos"] = True
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if isinstance(prompt, str | TokenIds):  # token ids: the engine reads them as given
            body["prompt"] = prompt if isinstance(prompt, str) else list(prompt.ids)
            return "/completions", body
        body["messages"] = [{"role": m.role, "content": m.content}
                            if m.tool_calls is None and m.tool_call_id is None else _message(m)
                            for m in prompt]
        if params.tools is not None:
            body["tools"] = params.tools
        if params.tool_choice is not None:
            body["tool_choice"] = params.tool_choice
        if params.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = params.parallel_tool_calls
        return "/chat/completions", body

    def _wrap(self, exc: Exception) -> BackendError:
        if isinstance(exc, httpx.TimeoutException | http1.HTTPTimeout):
            return UpstreamTimeoutError(f"{self.name}: upstream timed out ({type(exc).__name__})")
        if isinstance(exc, httpx.HTTPError | http1.HTTPConnectError):
            return BackendError(f"{self.name}: upstream unreachable: {type(exc).__name__}: {exc}")
        return BackendError(f"{self.name}: bad upstream response: {exc}")

    def _check(self, resp: httpx.Response | http1.Response) -> None:
        if resp.status_code >= 400:
            cls = UpstreamRequestError if resp.status_code in (400, 413, 422) else UpstreamStatusError
            raise cls(
                f"{self.name}: upstream HTTP {resp.status_code}: {_error_text(resp)}",
                resp.status_code)

    @staticmethod
    def _result(path: str, data: dict, tools: bool = False) -> GenerationResult:
        """A whole answer; with ``tools`` (the request sent them) its tool calls too."""
        choice = data["choices"][0]
        text = choice["text"] if path == "/completions" else choice["message"].get("content")
        usage = data.get("usage") or {}
        out = GenerationResult(text or "", int(usage.get("prompt_tokens", 0)),
                               int(usage.get("completion_tokens", 0)),
                               _finish(choice.get("finish_reason")))
        if tools and path != "/completions":
            out.tool_calls = choice["message"].get("tool_calls") or None
        return out

    def _score_body(self, prompt: str, continuation: str) -> dict:
        if not continuation:
            raise RequestError("score: continuation is empty")
        return {"model": self.model, "prompt": prompt + continuation, "echo": True,
                "logprobs": 1, "max_tokens": 1, "temperature": 0.0}

    def _score_result(self, prompt: str, continuation: str, data: dict) -> ScoreResult:
        lp = data["choices"][0].get("logprobs")
        if not lp or "text_offset" not in lp:
            raise BackendError(f"{self.name}: upstream returned no prompt logprobs "
                               "(does it support echo + logprobs on /completions?)")
        text = data["choices"][0].get("text", "")
        return select_continuation(text, len(prompt), len(prompt) + len(continuation),
                                   lp["tokens"], lp["token_logprobs"], lp["text_offset"])

    # --- sync ----------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        path, body = self._body(prompt, params, stream=False)
        try:
            resp = self.client.post(path, json=body)
            self._check(resp)
            return self._result(path, resp.json(), "tools" in body)
        except BackendError:
            raise
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise self._wrap(exc) from exc

    def stream(self, prompt: Prompt, params: GenerationParams) -> Iterator[StreamChunk]:
        path, body = self._body(prompt, params, stream=True)
        try:
            with self.client.stream("POST", path, json=body) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._check(resp)
                parser = SSEParser(self.name, chat=path != "/completions", tools="tools" in body)
                for line in resp.iter_lines():
                    yield from parser.feed(line)
                    if parser.done:
                        break
                yield parser.final()
        except BackendError:
            raise
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise self._wrap(exc) from exc

    def score(self, prompt: str, continuation: str) -> ScoreResult:
        body = self._score_body(prompt, continuation)
        try:
            resp = self.client.post("/completions", json=body)
            self._check(resp)
            return self._score_result(prompt, continuation, resp.json())
        except BackendError:
            raise
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise self._wrap(exc) from exc

    # --- async (native) --------------------------------------------------------------
    _ASYNC_ERRORS = (http1.HTTPTimeout, http1.HTTPConnectError, ValueError, KeyError,
                     IndexError, TypeError)

    async def _apost(self, path: str, body: dict) -> dict:
        resp = await self.pool.post(path, json.dumps(body).encode())
        self._check(resp)
        return json.loads(resp.content)

    async def agenerate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        path, body = self._body(prompt, params, stream=False)
        try:
            return self._result(path, await self._apost(path, body), "tools" in body)
        except BackendError:
            raise
        except self._ASYNC_ERRORS as exc:
            raise self._wrap(exc) from exc

    async def astream(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        path, body = self._body(prompt, params, stream=True)
        try:
            async with self.pool.stream(path, json.dumps(body).encode()) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    self._check(resp)
                parser = SSEParser(self.name, chat=path != "/completions", tools="tools" in body)
                async for line in resp.aiter_lines():
                    for chunk in parser.feed(line):
                        yield chunk
                    if parser.done:
                        break
                if parser.done:  # the rest of the body (the last chunk's terminator)
                    async for _ in resp.aiter_raw():
                        pass
                yield parser.final()
        except BackendError:
            raise
        except self._ASYNC_ERRORS as exc:
            raise self._wrap(exc) from exc

    async def ascore(self, prompt: str, continuation: str) -> ScoreResult:
        body = self._score_body(prompt, continuation)
        try:
            return self._score_result(prompt, continuation, await self._apost("/completions", body))
        except BackendError:
            raise
        except self._ASYNC_ERRORS as exc:
            raise self._wrap(exc) from exc


def build(cfg, role: str | None = None, torch_threads: int | None = None) -> OpenAIUpstreamBackend:
    """The registry's factory for kind ``upstream`` (models/registry.py); ``role`` is the
    architecture the operator states (the server does not say)."""
    from models.registry import BackendSpecError

    if not cfg.base_url or not cfg.model:
        raise BackendSpecError(f"{cfg.name}: kind upstream needs base_url and model")
    key = cfg.api_key
    key = key.get_secret_value() if hasattr(key, "get_secret_value") else key
    return OpenAIUpstreamBackend(cfg.name, cfg.base_url, cfg.model, api_key=key,
                                 architecture=stated_architecture(role), timeout=cfg.timeout_s,
                                 max_concurrency=cfg.max_concurrency or 64,
                                 call_tools=cfg.call_tools is not False)
