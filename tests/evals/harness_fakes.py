"""Fakes for the harness tests: backends with a planted gap and a linear cost model
(imported by the test modules; a plain module, not a conftest, so the analysis tests that
share this folder are unaffected)."""

from __future__ import annotations

from dataclasses import dataclass

from models.base import ScoreResult
from models.fake import FakeBackend, fake_tokens


@dataclass(frozen=True)
class LinearCost:
    """FLOPs = per_token x tokens; memory = per_token_bytes x context + state."""

    per_token: float
    per_token_bytes: float = 0.0
    state_bytes: float = 0.0

    def request_flops(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.per_token * (prompt_tokens + output_tokens)

    def memory_bytes(self, context: int) -> float:
        return self.per_token_bytes * context + self.state_bytes


class PlantedBackend(FakeBackend):
    """Every reference token costs ``base`` nats, plus ``penalty`` when the prompt holds
    ``weak_word`` (the planted gap). ``location`` stands for the weights' identity."""

    def __init__(self, name: str, architecture: str, weak_word: str, penalty: float = 1.0,
                 base: float = 1.0, per_token: float = 1.0, location: str = "fake://v1") -> None:
        super().__init__(name, architecture)  # type: ignore[arg-type]
        self.weak_word, self.penalty, self.base = weak_word, penalty, base
        self.per_token, self.location = per_token, location
        self.scored = 0

    def info(self):
        from models.base import BackendInfo

        return BackendInfo(self.name, self.architecture, parameters=1, location=self.location)

    def cost_model(self):
        return LinearCost(self.per_token, per_token_bytes=2.0 if self.architecture == "transformer" else 0.0,
                          state_bytes=0.0 if self.architecture == "transformer" else 100.0)

    def encode(self, text: str) -> list[int]:
        return list(range(len(fake_tokens(text))))

    def score(self, prompt: str, continuation: str) -> ScoreResult:
        self.scored += 1
        toks = fake_tokens(continuation)
        lp = -(self.base + (self.penalty if self.weak_word in prompt else 0.0))
        return ScoreResult(toks, [lp] * len(toks))


def planted_pair() -> tuple[PlantedBackend, PlantedBackend]:
    """The transformer loses 1 nat/token on 'explain' prompts, the hybrid on 'repeat' ones;
    the transformer costs 2 FLOPs per token, the hybrid 1."""
    t = PlantedBackend("fake-t", "transformer", "explain", per_token=2.0)
    h = PlantedBackend("fake-h", "hybrid", "repeat", per_token=1.0)
    return t, h
