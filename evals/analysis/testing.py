"""Backends whose per-token losses you control, for testing the analysis (and for trying
the report on a planted effect). Not used by the analysis itself.

Tokens are words, single punctuation marks and whitespace runs, each with its leading
whitespace (``\\s*\\w+ | \\s*[^\\w\\s] | \\s+``), so a text's tokens join back to it exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from models.base import Backend, BackendInfo, GenerationParams, GenerationResult, ScoreResult

_TOKEN = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")
LossFn = Callable[[str, int], float]  # (token text, position in window) -> loss in nats


class WordTokenizer:
    """A tiny HF-like tokenizer: ``tok(text, add_special_tokens=False,
    return_offsets_mapping=True)`` -> {"input_ids", "offset_mapping"}; ids grow on demand."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<s>": 0}

    def __call__(self, text: str, add_special_tokens: bool = False,
                 return_offsets_mapping: bool = False) -> dict:
        ids, offs = [], []
        for m in _TOKEN.finditer(text):
            ids.append(self.vocab.setdefault(m.group(), len(self.vocab)))
            offs.append(m.span())
        out: dict = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offs
        return out

    def get_vocab(self) -> dict[str, int]:
        return self.vocab

    def token(self, i: int) -> str:
        return next(k for k, v in self.vocab.items() if v == i)


class ControlledBackend(Backend):
    """Scores through ``score``/``score_batch`` only (the generic path, like an upstream).
    The loss of each token is ``loss_fn(token_text, position)``; the first token of a
    scored text is at position 0."""

    def __init__(self, name: str, loss_fn: LossFn, architecture: str = "other",
                 tokenizer: WordTokenizer | None = None) -> None:
        super().__init__(name)
        self.loss_fn = loss_fn
        self.architecture = architecture
        self.tokenizer = tokenizer or WordTokenizer()  # lets the generic path cut token windows
        self.score_calls = 0

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.architecture, location="controlled")  # type: ignore[arg-type]

    def generate(self, prompt, params: GenerationParams) -> GenerationResult:
        return GenerationResult("", 0, 0, "stop")

    def score(self, prompt: str, continuation: str) -> ScoreResult:
        self.score_calls += 1
        toks = [m.group() for m in _TOKEN.finditer(continuation)]
        lps = [-float(self.loss_fn(t, i)) for i, t in enumerate(toks)]
        return ScoreResult(toks, lps, self.tokenizer(continuation)["input_ids"])


class ControlledIdsBackend(ControlledBackend):
    """Adds the token-id fast path: ``tokenizer``, ``prefix_id`` and ``score_ids``."""

    prefix_id = 0

    def __init__(self, name: str, loss_fn: LossFn, architecture: str = "other",
                 tokenizer: WordTokenizer | None = None) -> None:
        super().__init__(name, loss_fn, architecture, tokenizer)
        self.ids_calls = 0

    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 8) -> list[np.ndarray]:
        self.ids_calls += 1
        inv = {v: k for k, v in self.tokenizer.vocab.items()}
        return [np.asarray([-float(self.loss_fn(inv[t], i)) for i, t in enumerate(s[1:])],
                           np.float32) for s in seqs]
