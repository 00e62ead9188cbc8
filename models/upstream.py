"""A backend that is any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, or
``archroute serve-model``), spoken to over HTTP with aiohttp: natively on the event loop
(the router's path); the blocking methods (CLI commands, scripts) run the same code on the
backend's own loop in a daemon thread.

A completion prompt (``str``) goes to ``/completions``, a conversation to
``/chat/completions``. ``score`` uses ``/completions`` with ``echo: true, logprobs: 1,
max_tokens: 1``: the server returns the log-probability of every prompt token (vLLM does;
the first token's is null), and the continuation's tokens are cut out by character offset.
``score_prompt`` (the prompt probe) asks for the prompt's own log-probabilities with one
answer token: a text prompt (or token ids) on ``/completions`` with ``echo`` + ``logprobs``
as above, a conversation on ``/chat/completions`` with vLLM's ``prompt_logprobs: 0`` (the
server applies its chat template; the answer's top-level ``prompt_logprobs``, first entry
null). A server that answers without them fails the call (:class:`BackendError`).

Tool calling: the backend ``can_call_tools`` (unless built with ``call_tools=False``):
``GenerationParams.tools`` / ``tool_choice`` / ``parallel_tool_calls`` go into the chat body,
a conversation's ``tool_calls`` / ``tool_call_id`` (and a tool turn's ``name``) into its
messages, and the answer's ``message.tool_calls`` (streamed: ``delta.tool_calls``, as the
upstream sends them) come back with ``finish_reason`` ``tool_calls``. An answer's tool calls
are read only when the request sent tools.

Transport: HTTP framing, pooling and parsing are the libraries' (aiohttp's C parser accepts
interim ``1xx`` responses and never pools a connection holding unread bytes). One
``aiohttp.ClientSession`` per backend, made on first use inside the serving loop, keeps up
to ``max_concurrency`` connections alive for ``KEEPALIVE_EXPIRY_S``; a request is never sent
twice (aiohttp retries only idempotent methods; every call here is a POST), and redirects
are not followed. A response body past ``max_response_bytes`` (streamed ones too) is
refused. Every failure becomes a :class:`~models.base.BackendError` in one place
(:meth:`OpenAIUpstreamBackend.errors`): timeouts an :class:`UpstreamTimeoutError`, HTTP
errors an :class:`UpstreamStatusError`, an oversized body a :class:`ResponseTooLargeError`,
so the router can fall back. A stream that ends without ``data: [DONE]`` but with its body
complete ends normally; a stream cut off mid-body is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar, cast

import aiohttp
import yarl

from models.base import (
    Architecture,
    Backend,
    BackendError,
    BackendInfo,
    GenerationParams,
    GenerationResult,
    Prompt,
    PromptScore,
    RequestError,
    ScoreResult,
    StreamChunk,
    TokenIds,
    stated_architecture,
)
from models.openai_wire import SSEParser as SSEParser
from models.openai_wire import error_text, finish_reason, select_continuation, wire_message
from models.registry import DEFAULT_MAX_RESPONSE_BYTES

# idle upstream connections are dropped after this, before a server's usual 5 s keep-alive
# closes them under us (no requests racing a close, no CLOSE-WAIT sockets piling up)
KEEPALIVE_EXPIRY_S = 4.0
T = TypeVar("T")
DRAIN_S = 1.0  # after `data: [DONE]`, wait this long for the body's end (then pool the conn)


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


class ResponseTooLargeError(BackendError):
    """The upstream's response body (or stream) passed ``max_response_bytes``."""


class BodyReader:
    """Counts a response body against ``limit`` bytes as it arrives and cuts it into lines
    (SSE framing: without their ``\n`` / ``\r\n``). ``add(data)`` for a whole body,
    ``lines(data)`` for a stream, ``rest()`` for the last line without a line end."""

    __slots__ = ("name", "limit", "size", "_parts")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.size = 0
        self._parts: list[bytes] = []

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise ResponseTooLargeError(f"{self.name}: the upstream's response is over "
                                        f"{self.limit} bytes")
        self._parts.append(data)

    def body(self) -> bytes:
        return b"".join(self._parts)

    def lines(self, data: bytes) -> list[str]:
        self.add(data)
        if b"\n" not in data:
            return []
        *lines, tail = b"".join(self._parts).split(b"\n")
        self._parts = [tail] if tail else []
        return [line.rstrip(b"\r").decode("utf-8", "replace") for line in lines]

    def rest(self) -> list[str]:
        tail, self._parts = b"".join(self._parts), []
        return [tail.rstrip(b"\r").decode("utf-8", "replace")] if tail else []


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, except that a pooled connection that received bytes while it
    idled (an upstream pushing an unsolicited response, aiohttp issue #13656) is closed
    instead of being handed to the next request, which would read them as its answer."""

    async def connect(self, *args: Any, **kwargs: Any) -> aiohttp.connector.Connection:
        while True:
            conn = await super().connect(*args, **kwargs)
            if conn.protocol is None or not conn.protocol.should_close:
                return conn
            conn.close()


class OpenAIUpstreamBackend(Backend):
    """An OpenAI-compatible server at ``base_url`` (including ``/v1``), serving ``model``.

    ``timeout`` (s) bounds a whole non-streamed call and each gap between streamed chunks;
    ``connect_timeout`` (s) bounds connecting; ``max_response_bytes`` bounds a response body
    (a stream's too). ``architecture`` is what the operator states about the model (the
    server does not say).
    """

    can_score_prompt = True

    def __init__(self, name: str, base_url: str, model: str, api_key: str | None = None,
                 architecture: Architecture = "other", timeout: float = 60.0,
                 connect_timeout: float = 5.0, max_concurrency: int = 64,
                 call_tools: bool = True,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        super().__init__(name, max_concurrency)
        # False: the server takes no tools (e.g. vLLM without --enable-auto-tool-choice);
        # the router then drops a request's tools for it (or refuses them, `tools: error`)
        self.can_call_tools = call_tools
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.architecture = architecture
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_response_bytes = max_response_bytes
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        self._urls: dict[str, yarl.URL] = {}  # path -> parsed URL (parsed once)
        self._sync_loop: asyncio.AbstractEventLoop | None = None  # the blocking methods'
        self._sync_lock = threading.Lock()
        self._sync_stop: weakref.finalize | None = None

    # --- transport -----------------------------------------------------------------
    @property
    def session(self) -> aiohttp.ClientSession:
        """The backend's aiohttp session for the running event loop (the serving loop, or
        the blocking methods' own), made on first use there and kept for its requests."""
        loop = asyncio.get_running_loop()
        s = self._sessions.get(loop)
        if s is None or s.closed:
            for gone in [lp for lp in self._sessions if lp.is_closed()]:
                del self._sessions[gone]  # a script's finished asyncio.run
            connector = _Connector(limit=self.max_concurrency,
                                   keepalive_timeout=KEEPALIVE_EXPIRY_S)
            # no cookies (an OpenAI-style API sets none; a jar costs CPU on every answer), no
            # decompression or User-Agent/Accept-Encoding headers nobody asked for
            s = self._sessions[loop] = aiohttp.ClientSession(
                headers=self._headers, connector=connector, raise_for_status=False,
                trust_env=False, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return s

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the blocking methods' event loop (a daemon thread, started on
        first use) and wait for its result."""
        with self._sync_lock:
            if self._sync_loop is None:
                loop = self._sync_loop = asyncio.new_event_loop()
                threading.Thread(target=_run_loop, args=(loop,), daemon=True,
                                 name=f"upstream-{self.name}").start()
                # closed by close(), or when the backend is collected or the process exits
                self._sync_stop = weakref.finalize(self, _stop_loop, loop, self._sessions)
            loop = self._sync_loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def close(self) -> None:
        """Close the blocking methods' session and stop their thread."""
        with self._sync_lock:
            self._sync_loop = None
            stop, self._sync_stop = self._sync_stop, None
        if stop is not None:
            stop()

    async def aclose(self) -> None:
        """Close the running loop's session (and the blocking methods' one)."""
        s = self._sessions.pop(asyncio.get_running_loop(), None)
        if s is not None:
            await s.close()
        if self._sync_loop is not None and self._sync_loop is not asyncio.get_running_loop():
            await asyncio.to_thread(self.close)

    def _wrap(self, exc: Exception) -> BackendError:
        if isinstance(exc, TimeoutError):  # aiohttp's own timeouts are TimeoutErrors too
            return UpstreamTimeoutError(f"{self.name}: upstream timed out ({type(exc).__name__})")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return BackendError(f"{self.name}: upstream unreachable: {type(exc).__name__}: {exc}")
        if isinstance(exc, aiohttp.ClientError):
            return BackendError(f"{self.name}: upstream connection failed: "
                                f"{type(exc).__name__}: {exc}")
        return BackendError(f"{self.name}: bad upstream response: {type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """The one place a transport or parsing failure becomes a :class:`BackendError`
        (a :class:`BackendError` or :class:`RequestError` raised inside passes unchanged)."""
        try:
            yield
        except (BackendError, RequestError):
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError,
                TypeError) as exc:
            raise self._wrap(exc) from exc

    def _check(self, status: int, content: bytes) -> None:
        """An error status (or a redirect, which is not followed) raises."""
        if status >= 300:
            cls = UpstreamRequestError if status in (400, 413, 422) else UpstreamStatusError
            raise cls(f"{self.name}: upstream HTTP {status}: {error_text(content)}", status)

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body, at most ``max_response_bytes``."""
        reader = self._reader(resp.content_length)
        async for data in resp.content.iter_any():
            reader.add(data)
        return reader.body()

    def _reader(self, length: int | None) -> BodyReader:
        if length is not None and length > self.max_response_bytes:
            raise ResponseTooLargeError(f"{self.name}: the upstream's response is {length} "
                                        f"bytes, over {self.max_response_bytes}")
        return BodyReader(self.name, self.max_response_bytes)

    @contextlib.asynccontextmanager
    async def _open(self, path: str, body: dict, stream: bool
                    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response to a POST with its head read and its status checked. Leaving the
        block with the body read to its end pools the connection; otherwise it is closed.
        A whole answer must come within ``timeout``; a stream's every read."""
        timeout = (aiohttp.ClientTimeout(sock_connect=self.connect_timeout,
                                         sock_read=self.timeout) if stream
                   else aiohttp.ClientTimeout(total=self.timeout,
                                              sock_connect=self.connect_timeout))
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = yarl.URL(self.base_url + path)
        async with self.session.post(url, data=json.dumps(body).encode(), timeout=timeout,
                                     allow_redirects=False) as resp:
            if resp.status >= 300:
                self._check(resp.status, await self._read(resp))
            yield resp

    async def aprobe(self) -> str | None:
        """``GET /models`` within 3 s: None when the server answers at all (an error status
        too: it is up, perhaps asking for a key), else why not, in one line."""
        try:
            async with self.session.get(self.base_url + "/models", allow_redirects=False,
                                        timeout=aiohttp.ClientTimeout(total=3.0)) as resp:
                await resp.read()
            return None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{self.base_url} unreachable ({type(exc).__name__})"

    async def _post(self, path: str, body: dict) -> dict:
        """A whole JSON answer."""
        async with self._open(path, body, stream=False) as resp:
            content = await self._read(resp)
        return json.loads(content)

    @contextlib.asynccontextmanager
    async def sse_lines(self, path: str, body: dict) -> AsyncIterator[AsyncIterator[str]]:
        """POST ``body`` (a streaming request) to ``path``; the block gets the response's
        lines as they arrive. Each wait for data is bounded by ``timeout``, the whole body
        by ``max_response_bytes``; failures are :class:`BackendError`. Leaving the block
        before the body's end closes the connection (an engine sees its client go and
        stops decoding)."""
        with self.errors():
            async with self._open(path, body, stream=True) as resp:
                yield self._lines(resp)

    async def _lines(self, resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
        with self.errors():
            reader = self._reader(resp.content_length)
            async for data in resp.content.iter_any():
                for line in reader.lines(data):
                    yield line
            for line in reader.rest():
                yield line

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
                            if m.tool_calls is None and m.tool_call_id is None else wire_message(m)
                            for m in prompt]
        if params.tools is not None:
            body["tools"] = params.tools
        if params.tool_choice is not None:
            body["tool_choice"] = params.tool_choice
        if params.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = params.parallel_tool_calls
        return "/chat/completions", body

    @staticmethod
    def _result(path: str, data: dict, tools: bool = False) -> GenerationResult:
        """A whole answer; with ``tools`` (the request sent them) its tool calls too."""
        choice = data["choices"][0]
        text = choice["text"] if path == "/completions" else choice["message"].get("content")
        usage = data.get("usage") or {}
        out = GenerationResult(text or "", int(usage.get("prompt_tokens", 0)),
                               int(usage.get("completion_tokens", 0)),
                               finish_reason(choice.get("finish_reason")))
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

    # --- async (native, on the event loop) -------------------------------------------
    async def agenerate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        path, body = self._body(prompt, params, stream=False)
        with self.errors():
            return self._result(path, await self._post(path, body), "tools" in body)

    async def astream(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        """The chunks, then a last one with the finish reason and usage. A body that ends
        without ``data: [DONE]`` ends the stream as well (finish reason as sent, else
        ``stop``); one cut off mid-body raises."""
        path, body = self._body(prompt, params, stream=True)
        parser = SSEParser(self.name, chat=path != "/completions", tools="tools" in body)
        with self.errors():
            async with self.sse_lines(path, body) as lines:
                async for line in lines:
                    for chunk in parser.feed(line):
                        yield chunk
                    if parser.done:
                        break
                if parser.done:  # the answer is whole: read the body's end to pool the conn
                    with contextlib.suppress(BackendError, TimeoutError):
                        async with asyncio.timeout(DRAIN_S):
                            async for _ in lines:
                                pass
            yield parser.final()

    async def ascore(self, prompt: str, continuation: str) -> ScoreResult:
        body = self._score_body(prompt, continuation)
        with self.errors():
            return self._score_result(prompt, continuation,
                                      await self._post("/completions", body))

    def _prompt_body(self, prompt: Prompt) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        if isinstance(prompt, str | TokenIds):
            if not (prompt if isinstance(prompt, str) else prompt.ids):
                raise RequestError("score_prompt: the prompt is empty")
            body.update(prompt=prompt if isinstance(prompt, str) else list(prompt.ids),
                        echo=True, logprobs=1)
            return "/completions", body
        body["messages"] = [{"role": m.role, "content": m.content}
                            if m.tool_calls is None and m.tool_call_id is None else wire_message(m)
                            for m in prompt]
        body["prompt_logprobs"] = 0  # vLLM's extension (serve-model answers it too)
        return "/chat/completions", body

    def _prompt_result(self, prompt: Prompt, data: dict) -> PromptScore:
        """The prompt's tokens that carry a log-probability, from an echo (``/completions``)
        or ``prompt_logprobs`` (``/chat/completions``) answer."""
        if not isinstance(prompt, str | TokenIds):
            entries = data.get("prompt_logprobs")
            if not isinstance(entries, list):
                raise BackendError(f"{self.name}: upstream returned no prompt_logprobs (does "
                                   "it take vLLM's prompt_logprobs on /chat/completions?)")
            pieces, lps, keys = [], [], []
            for e in entries:
                if not e:  # the first token: nothing precedes it
                    continue
                key, v = next(iter(e.items()))  # the prompt's own token (prompt_logprobs 0)
                keys.append(str(key))
                pieces.append(str(v.get("decoded_token") or ""))
                lps.append(float(v["logprob"]))
            ids = [int(k) for k in keys] if all(k.isdigit() for k in keys) else None
            return PromptScore(pieces, lps, ids)
        lp = data["choices"][0].get("logprobs")
        if not lp or "text_offset" not in lp:
            raise BackendError(f"{self.name}: upstream returned no prompt logprobs "
                               "(does it support echo + logprobs on /completions?)")
        toks, vals, offs = lp["tokens"], lp["token_logprobs"], lp["text_offset"]
        n = (sum(1 for o in offs if o < len(prompt)) if isinstance(prompt, str)
             else len(prompt.ids))
        keep = [(t, v) for t, v in zip(toks[:n], vals[:n], strict=True) if v is not None]
        return PromptScore([t for t, _ in keep], [float(v) for _, v in keep])

    async def ascore_prompt(self, prompt: Prompt) -> PromptScore:
        path, body = self._prompt_body(prompt)
        with self.errors():
            return self._prompt_result(prompt, await self._post(path, body))

    # --- blocking (CLI commands, scripts): the same path, on the backend's own loop ------
    def generate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        return self._run(self.agenerate(prompt, params))

    def stream(self, prompt: Prompt, params: GenerationParams) -> Iterator[StreamChunk]:
        chunks = cast(AsyncGenerator[StreamChunk, None], self.astream(prompt, params))

        async def step() -> StreamChunk | None:
            return await anext(chunks, None)

        try:
            while (chunk := self._run(step())) is not None:
                yield chunk
        finally:
            self._run(chunks.aclose())

    def score(self, prompt: str, continuation: str) -> ScoreResult:
        return self._run(self.ascore(prompt, continuation))

    def score_prompt(self, prompt: Prompt) -> PromptScore:
        return self._run(self.ascore_prompt(prompt))


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_forever()
    loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop,
               sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession]) -> None:
    """Close the session on the blocking methods' loop, then stop the loop."""
    session = sessions.pop(loop, None)
    if session is not None and not loop.is_closed():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(session.close(), loop).result(5)
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)


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
                                 call_tools=cfg.call_tools is not False,
                                 max_response_bytes=cfg.max_response_bytes)
