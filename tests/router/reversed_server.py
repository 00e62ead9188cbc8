""":mod:`tests.router.learning_server` with the transformer's scores reversed: it predicts
new tokens well and tokens copied from the prompt badly, so the hybrid is better on copying
requests, the opposite of what the shipped classifier learned from the study's pair. A
learning loop on this traffic has something to gain (tests/router/test_learning_auto.py).

    python -m tests.router.reversed_server --config router.yaml --port 8123
"""

from __future__ import annotations

from models.base import ScoreResult
from tests.router import learning_server as L


class ReversedFake(L.CopyingFake):
    def score(self, prompt: str, continuation: str) -> ScoreResult:
        res = super().score(prompt, continuation)
        if self.architecture != "transformer":
            return res
        swap = L.SEEN_LOGPROB_T + L.NEW_LOGPROB_T  # -0.2 <-> -2.0
        return ScoreResult(res.tokens, [swap - lp for lp in res.logprobs])


if __name__ == "__main__":
    L.CopyingFake = ReversedFake  # type: ignore[misc]
    L.main()
