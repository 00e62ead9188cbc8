"""A fake backend pair with the study's contrast built in, for fast classifier tests.

Both "models" score whitespace-led tokens (models.fake.fake_tokens): a token that completes
a trigram already seen earlier (in the prompt or the answer so far) is cheap for the
transformer (it copies) and dearer for the hybrid; a new token is the other way round. So copy-heavy answers get negative gaps and novel
answers positive ones, which the features can learn.
"""

from __future__ import annotations

from models.base import Backend, BackendInfo, ScoreResult
from models.fake import fake_tokens


class CopyAwareFakeBackend(Backend):
    def __init__(self, name: str, copy_lp: float, new_lp: float) -> None:
        super().__init__(name)
        self.copy_lp, self.new_lp = copy_lp, new_lp

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, "other")

    def generate(self, prompt, params):  # pragma: no cover - not used
        raise NotImplementedError

    def score(self, prompt: str, continuation: str) -> ScoreResult:
        words = prompt.split()
        seen = {tuple(words[i:i + 3]) for i in range(len(words) - 2)}
        toks = fake_tokens(continuation)
        lps = []
        for t in toks:
            words.append(t.strip())
            gram = tuple(words[-3:])
            lps.append(self.copy_lp if gram in seen else self.new_lp)
            seen.add(gram)
        return ScoreResult(toks, lps)


def fake_pair() -> tuple[CopyAwareFakeBackend, CopyAwareFakeBackend]:
    """(transformer, hybrid): the transformer copies better, the hybrid predicts new text better."""
    return (CopyAwareFakeBackend("fake-transformer", -0.3, -2.2),
            CopyAwareFakeBackend("fake-hybrid", -0.9, -1.9))


_WORDS = ("river stone light garden memory window letter winter harbor voice story evening "
          "quietly slowly suddenly bright silent ancient gentle narrow she he they it their "
          "because although there was were had said walked remembered").split()


def synthetic_docs(n_per_domain: int = 12, seed: int = 0) -> list[dict]:
    """A tiny corpus (code, prose, html, tex) in the shape of data/corpus/train.jsonl."""
    import random

    rng = random.Random(seed)
    docs = []
    for i in range(n_per_domain):
        funcs = []
        for j in range(12):
            body = "\n".join(f"    x{k} = compute(x{k - 1}, [{k}, {j}])" for k in range(1, 6))
            funcs.append(f"def func_{i}_{j}(x0):\n    \"\"\"Compute things.\"\"\"\n{body}\n"
                         f"    return x5\n")
        docs.append({"id": f"code/{i}", "domain": "code", "text": "\n\n".join(funcs)})
        prose = " ".join(rng.choice(_WORDS) + ("." if rng.random() < 0.1 else "")
                         for _ in range(900))
        docs.append({"id": f"prose/{i}", "domain": "dict", "text": prose})
        items = "\n".join(f"  <li class=\"item\"><a href=\"p{k}.html\">{rng.choice(_WORDS)}</a></li>"
                          for k in range(60))
        docs.append({"id": f"html/{i}", "domain": "html", "text": f"<ul>\n{items}\n</ul>\n"})
        env = "\n".join(f"\\begin{{itemize}}\n\\item {rng.choice(_WORDS)} {rng.choice(_WORDS)}\n"
                        f"\\end{{itemize}}" for _ in range(40))
        docs.append({"id": f"tex/{i}", "domain": "tex", "text": env})
    return docs
