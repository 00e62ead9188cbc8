"""A real router process (uvicorn, ``router.server.serve``) on two fake backends whose
*scores* differ the way the study's pair does: the transformer predicts tokens it has seen in
the prompt well (copying) and new tokens badly; the hybrid is middling on both. So a
reference that repeats the prompt has a negative gap (transformer better) and a new one a
positive gap: a learnable pattern for the learning-loop test.

    python -m tests.router.learning_server --config router.yaml --port 8123
"""

from __future__ import annotations

import argparse

from models.base import ScoreResult
from models.fake import FakeBackend, fake_tokens

SEEN_LOGPROB_T, NEW_LOGPROB_T, LOGPROB_H = -0.2, -2.0, -1.0


class CopyingFake(FakeBackend):
    def score(self, prompt: str, continuation: str) -> ScoreResult:
        self._next("score", prompt + continuation, take_reply=False)
        toks = fake_tokens(continuation)
        seen = set(prompt.split())
        if self.architecture == "transformer":
            lps = [SEEN_LOGPROB_T if t.strip() in seen else NEW_LOGPROB_T for t in toks]
        else:
            lps = [LOGPROB_H] * len(toks)
        return ScoreResult(toks, lps)


def main() -> None:
    from router.app import create_app
    from router.server import serve
    from router.settings import load_settings

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    settings = load_settings(a.config, {"port": a.port})
    backends = {role: CopyingFake(bs.name, role, default_reply=bs.fake_reply,  # type: ignore[arg-type]
                                  max_concurrency=bs.concurrency)
                for role, bs in settings.backends.items()}
    serve(create_app(settings, backends), settings.host, settings.port, settings,
          log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
