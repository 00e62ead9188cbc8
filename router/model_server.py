"""``archroute serve-model``: one backend as an OpenAI-compatible server, the way vLLM is run.

Routes: ``POST /v1/completions`` (with ``echo`` and ``logprobs``, so ``score`` works through
it as through vLLM), ``POST /v1/chat/completions``, ``GET /v1/models``, ``/health``, ``/ready``.
Streaming, errors and limits behave as in the router (shared modules).

Log-probabilities: ``logprobs: k`` returns each token's own log-probability (nats);
``top_logprobs`` holds only that token (no alternatives). With ``echo`` the prompt's tokens
come first and the first token's log-probability is ``null``, as vLLM does.

Token ids: a completion's ``prompt`` may be token ids (read as given, no start token added:
an in-process model only), and with ``stream``, ``logprobs`` and vLLM's
``return_tokens_as_token_ids`` every decoded token comes back as ``"token_id:N"`` with its
log-probability, as vLLM streams them: what the span decoder over two engines needs
(:mod:`models.span.remote`).

Limits (``max_concurrency``, ``max_queue``, ``timeout_s``, ``max_body_bytes``,
``max_tokens_cap``, ``api_keys``) are the settings' ``model_server`` section
(:class:`router.settings.ModelServerSettings`), read like the router's.

Prefix reuse: an in-process model keeps the caches of its last ``prefix_cache`` requests
(default 4; 0: off) and a request whose prompt starts with what one of them read resumes
from it, reading only the rest (:mod:`models.prefix_cache`: a transformer's KV cache is
cropped to the shared prefix, a hybrid's recurrent state resumed from a checkpoint). The
span decoder over two engines sends each engine the whole sequence at every span; with
reuse an engine reads only the tokens the other produced meanwhile. ``/ready`` shows the
counters (``prefix_cache``: requests, hits, reused and prompt tokens).

Tool calling: a chat request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (legacy
``functions`` / ``function_call`` mapped to them) reach a backend that ``can_call_tools``
(the fake with scripted tool calls: ``serve-model fake --fake-tool-calls JSON``), and its
calls come back as ``message.tool_calls`` / ``delta.tool_calls``; other backends ignore them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse

from models.base import Backend, GenerationParams, Prompt, ScoreResult
from models.hf import HFBackend
from router import errors
from router import protocol as P
from router.app import GuardMiddleware
from router.pool import BackendSlot, SlotLimits
from router.settings import ModelServerSettings
from router.streaming import sse_events

if TYPE_CHECKING:
    from models.prefix_cache import PrefixCache


def token_offsets(backend: Backend, text: str, res: ScoreResult) -> tuple[list[str], list[int]]:
    """Each scored token's text and character offset in ``text`` (the text it was scored on).

    Works when the tokens spell the text, or from the tokenizer's offset mapping when the
    backend has a (fast) tokenizer and gave token ids.
    """
    if "".join(res.tokens) == text:
        offsets, pos = [], 0
        for t in res.tokens:
            offsets.append(pos)
            pos += len(t)
        return list(res.tokens), offsets
    tok = backend.tokenizer
    if tok is not None and res.token_ids is not None:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(res.token_ids):
            spans = enc["offset_mapping"]
            return [text[s:e] for s, e in spans], [s for s, _ in spans]
    raise errors.InvalidRequestError("logprobs: this backend cannot map tokens to text offsets",
                                     param="logprobs")


async def completion_logprobs(slot: BackendSlot, prompt: str, generated: str,
                              echo: bool) -> dict | None:
    """OpenAI's legacy ``logprobs`` object for ``[prompt +] generated``, scored through the
    model's slot (its limits and timeout, like the generation).

    The prompt is scored on its own (as the engine saw it) and the generated text given the
    prompt, so no token spans the boundary.
    """
    backend = slot.backend
    toks: list[str] = []
    lps: list[float | None] = []
    offsets: list[int] = []
    if echo and prompt:
        res = await slot.score("", prompt)
        t, o = token_offsets(backend, prompt, res)
        toks, offsets, lps = t, o, [None, *res.logprobs[1:]]  # nothing precedes token 0
    if generated:
        res = await slot.score(prompt, generated)
        t, o = token_offsets(backend, generated, res)
        toks += t
        offsets += [len(prompt) + x for x in o]
        lps += list(res.logprobs)
    return {"tokens": toks, "token_logprobs": lps,
            "top_logprobs": [None if lp is None else {t: lp} for t, lp in zip(toks, lps, strict=True)],
            "text_offset": offsets}


async def prompt_logprobs(slot: BackendSlot, prompt: Prompt, asked: object) -> list[dict | None]:
    """vLLM's ``prompt_logprobs`` answer (the prompt probe's, router/probing.py): one entry
    per prompt token, the first null (the start token: nothing precedes it), each
    ``{"TOKEN_ID": {"logprob", "rank": null, "decoded_token"}}`` with the prompt's own token
    only (``asked`` must be 0: no top alternatives), scored through the model's slot."""
    if asked != 0 or isinstance(asked, bool):
        raise errors.InvalidRequestError("prompt_logprobs: only 0 is supported (the prompt "
                                         "tokens' own log-probabilities)", param="prompt_logprobs")
    res = await slot.score_prompt(prompt)
    keys = res.ids if res.ids is not None else res.pieces  # no ids (the fake): the texts
    return [None, *({str(k): {"logprob": lp, "rank": None, "decoded_token": piece}}
                    for k, piece, lp in zip(keys, res.pieces, res.logprobs, strict=True))]


def token_ids_out(body: P.ChatCompletionRequest | P.CompletionRequest) -> bool:
    """vLLM's streamed token ids: a completion with ``return_tokens_as_token_ids`` and
    ``logprobs`` (each token comes back as ``"token_id:N"`` with its log-probability)."""
    return (isinstance(body, P.CompletionRequest) and body.return_tokens_as_token_ids
            and body.logprobs is not None and bool(body.stream))


class ModelService:
    """One backend served as an OpenAI-compatible model named ``name``, within ``limits``:
    what serve-model's endpoints (:mod:`router.api.model`) call; kept in ``app.state``."""

    def __init__(self, backend: Backend, name: str, limits: ModelServerSettings) -> None:
        self.backend = backend
        self.name = name
        self.max_tokens_cap = limits.max_tokens_cap
        self.slot = BackendSlot("model", backend, SlotLimits(
            timeout_s=limits.timeout_s,
            max_concurrency=limits.max_concurrency or backend.max_concurrency,
            max_queue=limits.max_queue, queue_timeout_s=limits.timeout_s,
            failure_threshold=10**9, cooldown_s=1.0))  # one model, no fallback: no breaker
        self.prefix_cache: PrefixCache | None = None
        if limits.prefix_cache and isinstance(backend, HFBackend):
            from models.prefix_cache import PrefixCache

            self.prefix_cache = backend.prefix_cache = PrefixCache(limits.prefix_cache)

    def ready(self) -> dict:
        """``/ready``'s body: in flight, waiting, and the prefix cache's counters."""
        out: dict = {"ready": True, "in_flight": self.slot.in_flight, "waiting": self.slot.waiting}
        if self.prefix_cache is not None:
            out["prefix_cache"] = self.prefix_cache.stats()
        return out

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise errors.ModelNotFoundError(
                f"model {model!r} not found; this server serves {self.name!r}", param="model")

    def params(self, body: P.ChatCompletionRequest | P.CompletionRequest) -> GenerationParams:
        asked = body.requested_max_tokens()
        out = GenerationParams(
            max_tokens=None if asked is None else min(asked, self.max_tokens_cap),
            temperature=body.temperature, top_p=body.top_p, seed=body.seed,
            stop=body.stop_list(),
            ignore_eos=isinstance(body, P.CompletionRequest) and body.ignore_eos,
            logprobs=token_ids_out(body),
            top_logprobs=(body.logprobs or 0) if isinstance(body, P.CompletionRequest)
            and token_ids_out(body) else 0)
        if self.backend.can_call_tools and isinstance(body, P.ChatCompletionRequest):
            tools = body.tool_fields()
            if tools is not None:
                tools.apply(out)
        return out

    def card(self) -> dict:
        info = self.backend.info()
        return P.model_card(self.name, "archroute", architecture=info.architecture,
                            parameters=info.parameters, max_model_len=info.context_length)

    async def serve(self, body: P.ChatCompletionRequest | P.CompletionRequest) -> Response:
        try:
            return await self._serve(body)
        except Exception as exc:  # noqa: BLE001 - one mapper makes the envelope
            raise errors.to_api_error(exc) from exc

    async def _serve(self, body: P.ChatCompletionRequest | P.CompletionRequest) -> Response:
        backend, slot, model_name = self.backend, self.slot, self.name
        chat = isinstance(body, P.ChatCompletionRequest)
        body.log_unknown(model_name)
        self.check_model(body.model)
        ids = body.token_prompt() if isinstance(body, P.CompletionRequest) else None
        if ids is not None and not backend.accepts_token_ids:
            raise errors.InvalidRequestError(
                f"prompt: {model_name} takes text prompts, not token ids", param="prompt")
        try:
            prompt = body.chat_messages() if isinstance(body, P.ChatCompletionRequest) \
                else ids or body.prompt_text()
        except ValueError as exc:  # the request's own checks: a 400 (router/errors.py)
            raise errors.client_error(exc) from None
        echo = getattr(body, "echo", False)
        if ids is not None and (echo or (getattr(body, "logprobs", None) is not None
                                         and not body.stream)):
            raise errors.InvalidRequestError(
                "prompt: with token ids, echo is not supported and logprobs only with stream "
                "and return_tokens_as_token_ids", param="prompt")
        as_ids = token_ids_out(body)
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            if body.n > 1:
                raise errors.InvalidRequestError("n > 1 is not supported with stream", param="n")
            stream = await slot.open_stream(prompt, self.params(body))
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = sse_events(stream, rid=rid, model=model_name, chat=chat,
                                include_usage=include_usage,
                                echo=prompt if echo and isinstance(prompt, str) else "",
                                token_ids=as_ids)
            return StreamingResponse(events, media_type="text/event-stream")
        results = []
        for i in range(body.n):
            p = self.params(body)
            if p.seed is not None:
                p.seed += i
            results.append(await slot.generate(prompt, p))
        n_prompt = results[0].prompt_tokens
        n_out = sum(r.completion_tokens for r in results)
        choices = [(r.text, str(r.finish_reason)) for r in results]
        asked = (body.model_extra or {}).get("prompt_logprobs")
        extra = None if asked is None else {
            "prompt_logprobs": await prompt_logprobs(slot, prompt, asked)}
        if chat:
            calls = [r.tool_calls for r in results]
            return JSONResponse(P.chat_response(rid, model_name, choices, n_prompt, n_out,
                                                tool_calls=calls if any(calls) else None,
                                                extra=extra))
        assert isinstance(prompt, str)
        logprobs = None
        if getattr(body, "logprobs", None) is not None:
            logprobs = [await completion_logprobs(slot, prompt, r.text, echo) for r in results]
        if echo:
            choices = [(prompt + t, f) for t, f in choices]
        return JSONResponse(P.completion_response(rid, model_name, choices, n_prompt, n_out,
                                                  logprobs=logprobs, extra=extra))


def create_model_app(backend: Backend, name: str | None = None,
                     settings: ModelServerSettings | None = None) -> FastAPI:
    """A single-model server for ``backend``, which clients address as ``name``, within the
    limits of ``settings`` (the defaults when None); its endpoints are :mod:`router.api.model`."""
    from router.api import model as endpoints

    limits = settings if settings is not None else ModelServerSettings()
    svc = ModelService(backend, name or backend.name, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await backend.aclose()

    app = FastAPI(title=f"ArchRoute model server: {svc.name}", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.model = svc
    app.state.slot = svc.slot
    errors.install(app)
    app.add_middleware(GuardMiddleware,  # type: ignore[arg-type]
                       api_keys=[k.get_secret_value() for k in limits.api_keys],
                       max_body_bytes=limits.max_body_bytes)
    app.include_router(endpoints.router)
    errors.openapi_without_422(app)
    return app
