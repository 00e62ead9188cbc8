"""The model deployments' replica classes: one in-process backend (:class:`ModelReplica`),
or both models of the pair and their span decoders (:class:`SpanReplica`).

Each is a plain class; :mod:`router.rayserve.app` makes deployments of them with the
settings' replica counts and resources. A replica builds its backend the way every command
does (:func:`models.registry.build`), so a replica serves exactly what ``archroute serve``
would serve in-process. Relative paths in the settings mean what they meant where the
command ran: a replica starts in that folder when its node has it (``cwd``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from models.base import (
    GenerationParams,
    GenerationResult,
    Prompt,
    PromptScore,
    ScoreResult,
    StreamChunk,
)
from router.rayserve.handles import BackendFacts

if TYPE_CHECKING:
    from models.base import Backend
    from router.settings import BackendSettings

SpanKey = tuple[str, tuple[int, int]]  # (gate, (draft_k, draft_min_match))


def enter(cwd: str | None) -> None:
    """Start in the folder the command ran in, where this node has it."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)


def _build(cfg: BackendSettings, role: str, torch_threads: int | None) -> Backend:
    from models import registry

    return registry.build(cfg, role, torch_threads)


class ModelReplica:
    """One replica of an in-process backend (kind ``hf``, or ``fake`` in tests)."""

    def __init__(self, cfg: BackendSettings, role: str, torch_threads: int | None = None,
                 cwd: str | None = None) -> None:
        enter(cwd)
        self.backend = _build(cfg, role, torch_threads)

    def facts(self) -> BackendFacts:
        return BackendFacts.of(self.backend)

    async def generate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        return await self.backend.agenerate(prompt, params)

    async def stream(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        async for chunk in self.backend.astream(prompt, params):
            yield chunk

    async def score(self, prompt: str, continuation: str) -> ScoreResult:
        return await self.backend.ascore(prompt, continuation)

    async def score_prompt(self, prompt: Prompt) -> PromptScore:
        return await self.backend.ascore_prompt(prompt)

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


class SpanReplica:
    """One replica of the span deployment: both models of the pair, loaded side by side, and
    a span decoder (:class:`~models.span.decoder.SpanBackend`) per gate and draft setting,
    built on first use. A pair that cannot be span-decoded is not an error here: ``check``
    says why, and the router answers span requests as it does for such a pair in-process."""

    def __init__(self, transformer: BackendSettings, hybrid: BackendSettings,
                 torch_threads: int | None = None, cwd: str | None = None) -> None:
        enter(cwd)
        self.transformer = _build(transformer, "transformer", torch_threads)
        self.hybrid = _build(hybrid, "hybrid", torch_threads)
        self.max_concurrency = transformer.concurrency
        self.decoders: dict[SpanKey, Backend] = {}

    def _decoder(self, gate: str, draft: tuple[int, int]) -> Backend:
        key = (gate, (int(draft[0]), int(draft[1])))
        found = self.decoders.get(key)
        if found is None:
            from models.span.decoder import SpanBackend
            from models.span.gates import get_gate

            found = SpanBackend(self.transformer, self.hybrid, get_gate(gate),
                                max_concurrency=self.max_concurrency, draft_k=key[1][0],
                                draft_min_match=key[1][1])
            self.decoders[key] = found
        return found

    def check(self, gate: str, draft: tuple[int, int]) -> tuple[str | None, BackendFacts | None]:
        """(why this pair cannot span-decode with ``gate`` and ``draft``, None) or (None,
        the decoder's facts)."""
        try:
            return None, BackendFacts.of(self._decoder(gate, draft))
        except Exception as exc:  # noqa: BLE001 - any refusal is said, as SpanService does
            return f"{type(exc).__name__}: {exc}", None

    async def generate(self, gate: str, draft: tuple[int, int], prompt: Prompt,
                       params: GenerationParams) -> GenerationResult:
        return await self._decoder(gate, draft).agenerate(prompt, params)

    async def stream(self, gate: str, draft: tuple[int, int], prompt: Prompt,
                     params: GenerationParams) -> AsyncIterator[StreamChunk]:
        async for chunk in self._decoder(gate, draft).astream(prompt, params):
            yield chunk

    def __del__(self) -> None:
        for b in (getattr(self, "transformer", None), getattr(self, "hybrid", None)):
            if b is not None:
                b.close()
