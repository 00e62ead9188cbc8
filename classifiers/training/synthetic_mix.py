"""The request mix the classifier learns from: requests with reference answers, built from
the reference corpus (``train.jsonl``: id, domain, text).

Every request is plain text (the tiny reference models are not chat-tuned) and carries a
reference answer taken from the same document, so a pair of backends can be scored on it
(:mod:`classifiers.training.labels`). Kinds (shares in :data:`KIND_SHARES`):

- ``continue``: a passage of any domain; the answer is the next 200-400 characters.
- ``quote``: a passage and "quote it verbatim"; the answer is its opening, copied.
- ``extract``: a passage and "copy the text that begins with <cue>"; the answer is the span.
- ``complete_function``: code up to a point inside a ``def``; the answer continues it.
- ``close_markup``: markup cut just before a closing tag/brace; the answer continues it.
- ``summarize`` / ``explain``: a passage and an instruction; the reference answer is a
  later passage of the same document (new, meaning-bearing text, no copy source).

Documents, not requests, are split between train and test (a stable hash of the id), so
no document feeds both. Sizes are in characters: prompts 300-2000, answers 200-400
(about 64-128 tokens), which keeps prompt + answer under ~900 tokens of the reference
pair's 4096-token vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from classifiers.request import RoutingRequest

KIND_SHARES: dict[str, float] = {
    "continue": 0.42,
    "quote": 0.12,
    "extract": 0.10,
    "complete_function": 0.08,
    "close_markup": 0.10,
    "summarize": 0.09,
    "explain": 0.09,
}
PROMPT_CHARS = (300, 2000)
ANSWER_CHARS = (200, 400)
TEST_SHARE = 0.2
MARKUP_DOMAINS = ("html", "tex", "markdown", "rest")
# Several phrasings per instruction, so a model learns the request, not one template.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "quote": ("{passage}\n\nQuote the passage above verbatim:\n",
              "Repeat the following text exactly.\n\n{passage}\n\nRepeated text:\n",
              "{passage}\n\nCopy the text above word for word:\n",
              "Reproduce this passage without changes:\n\n{passage}\n\n"),
    "extract": ("{passage}\n\nCopy the text that begins with \"{cue}\":\n",
                "{passage}\n\nExtract the part starting at \"{cue}\", verbatim:\n",
                "From the text below, quote the section that starts with \"{cue}\".\n\n"
                "{passage}\n\n"),
    "complete_function": ("Complete this function:\n\n{passage}",
                          "Finish the implementation below.\n\n{passage}",
                          "{passage}"),
    "close_markup": ("Close the open markup:\n\n{passage}",
                     "Continue this document and close every open element.\n\n{passage}",
                     "{passage}"),
    "summarize": ("{passage}\n\nSummary of the passage above:\n",
                  "Summarize the following text.\n\n{passage}\n\nSummary:\n",
                  "{passage}\n\nIn short, the passage says:\n"),
    "explain": ("Explain the following.\n\n{passage}\n\nExplanation:\n",
                "{passage}\n\nExplain what the text above means:\n",
                "What does this describe, and why?\n\n{passage}\n\n"),
}
_CLOSERS = re.compile(r"</|\\end\{|\n```|\}\n|\)\n")
_DEF = re.compile(r"^[ \t]*(?:async\s+)?def \w+\(", re.M)


@dataclass(frozen=True)
class MixRequest:
    """One request of the mix with its reference answer (plain text)."""

    id: str
    doc_id: str
    domain: str
    kind: str
    split: str  # "train" | "test"
    prompt: str
    answer: str

    def routing(self) -> RoutingRequest:
        return RoutingRequest.from_prompt(self.prompt)

    def to_json(self) -> dict:
        return asdict(self)


def doc_split(doc_id: str, test_share: float = TEST_SHARE) -> str:
    """'test' for a stable ``test_share`` of documents, else 'train'."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return "test" if (h % 10_000) < test_share * 10_000 else "train"


def load_documents(corpus: str | Path) -> list[dict]:
    """Documents of ``train.jsonl`` (or of the file ``corpus`` itself)."""
    path = Path(corpus)
    if path.is_dir():
        path = path / "train.jsonl"
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _snap(text: str, pos: int, forward: bool = True) -> int:
    """Move ``pos`` to the nearest whitespace boundary (forward or backward)."""
    pos = max(0, min(pos, len(text)))
    if forward:
        m = re.compile(r"\s").search(text, pos)
        return m.start() + 1 if m else len(text)
    i = text.rfind(" ", 0, pos)
    j = text.rfind("\n", 0, pos)
    return max(i, j) + 1 if max(i, j) >= 0 else 0


def _span(text: str, start: int, rng: random.Random) -> str:
    """A 200-400 character span of ``text`` from ``start``, ending at whitespace."""
    end = start + rng.randint(*ANSWER_CHARS)
    if end >= len(text):
        return text[start:]
    cut = text.rfind(" ", start + ANSWER_CHARS[0] // 2, end)
    cut = max(cut, text.rfind("\n", start + ANSWER_CHARS[0] // 2, end))
    return text[start:cut if cut > start else end]


def _passage(text: str, rng: random.Random, need_after: int) -> tuple[int, int] | None:
    """(start, end) of a random passage leaving ``need_after`` characters after it."""
    length = rng.randint(*PROMPT_CHARS)
    hi = len(text) - need_after - length
    if hi <= 0:
        length = len(text) - need_after - 1
        if length < PROMPT_CHARS[0] // 2:
            return None
        hi = 1
    start = _snap(text, rng.randrange(hi), forward=True) if hi > 1 else 0
    end = min(start + length, len(text) - need_after)
    return (start, end) if end - start >= PROMPT_CHARS[0] // 2 else None


def make_request(doc: dict, kind: str, rng: random.Random, idx: int) -> MixRequest | None:
    """One request of ``kind`` from ``doc``, or None when the document does not fit it."""
    text, domain = doc["text"], doc["domain"]
    prompt = answer = None
    if kind == "continue":
        p = _passage(text, rng, ANSWER_CHARS[1])
        if p:
            prompt, answer = text[p[0]:p[1]], _span(text, p[1], rng)
    elif kind == "quote":
        p = _passage(text, rng, 0)
        if p:
            passage = text[p[0]:p[1]]
            answer = _span(passage, 0, rng)
            prompt = rng.choice(TEMPLATES["quote"]).format(passage=passage)
    elif kind == "extract":
        p = _passage(text, rng, 0)
        if p:
            passage = text[p[0]:p[1]]
            starts = [m.end() for m in re.finditer(r"\n(?=\S)", passage[:-ANSWER_CHARS[0]])]
            if starts:
                s = rng.choice(starts)
                answer = _span(passage, s, rng)
                cue = " ".join(answer.split()[:6])
                prompt = rng.choice(TEMPLATES["extract"]).format(passage=passage, cue=cue)
    elif kind == "complete_function":
        defs = [m.start() for m in _DEF.finditer(text)]
        if domain == "code" and defs:
            d = rng.choice(defs)
            cut = _snap(text, d + rng.randint(40, 240), forward=True)
            begin = _snap(text, max(0, cut - rng.randint(*PROMPT_CHARS)), forward=False)
            if cut < len(text) - ANSWER_CHARS[0]:
                prompt = rng.choice(TEMPLATES[kind]).format(passage=text[begin:cut])
                answer = _span(text, cut, rng)
    elif kind == "close_markup":
        closers = [m.start() for m in _CLOSERS.finditer(text)
                   if PROMPT_CHARS[0] <= m.start() < len(text) - ANSWER_CHARS[0]]
        if domain in MARKUP_DOMAINS and closers:
            cut = rng.choice(closers)
            begin = _snap(text, max(0, cut - rng.randint(*PROMPT_CHARS)), forward=False)
            prompt = rng.choice(TEMPLATES[kind]).format(passage=text[begin:cut])
            answer = _span(text, cut, rng)
    elif kind in ("summarize", "explain"):
        gap = rng.randint(0, 1500)
        p = _passage(text, rng, ANSWER_CHARS[1] + gap)
        if p:
            passage = text[p[0]:p[1]]
            later = _snap(text, p[1] + gap, forward=True)
            answer = _span(text, later, rng)
            prompt = rng.choice(TEMPLATES[kind]).format(passage=passage)
    else:
        raise ValueError(f"unknown request kind {kind!r}; expected one of {list(KIND_SHARES)}")
    if not prompt or not answer or not answer.strip():
        return None
    return MixRequest(f"{doc['id']}#{kind}#{idx}", doc["id"], domain, kind, doc_split(doc["id"]),
                      prompt, answer)


def build_mix(docs: list[dict], n: int, seed: int = 0) -> list[MixRequest]:
    """``n`` requests: kinds drawn by :data:`KIND_SHARES`, domains uniformly (so small domains
    are not drowned), documents uniformly within a domain. Deterministic in ``seed``."""
    rng = random.Random(seed)
    by_domain: dict[str, list[dict]] = {}
    for d in docs:
        if len(d["text"]) >= PROMPT_CHARS[0] + ANSWER_CHARS[1]:
            by_domain.setdefault(d["domain"], []).append(d)
    if not by_domain:
        raise ValueError("no document is long enough to build requests from")
    domains = sorted(by_domain)
    kinds, weights = list(KIND_SHARES), list(KIND_SHARES.values())
    out: list[MixRequest] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        kind = rng.choices(kinds, weights)[0]
        if kind == "complete_function" and "code" in by_domain:
            domain = "code"
        elif kind == "close_markup":
            domain = rng.choice([d for d in domains if d in MARKUP_DOMAINS] or domains)
        else:
            domain = rng.choice(domains)
        req = make_request(rng.choice(by_domain[domain]), kind, rng, len(out))
        if req is not None:
            out.append(req)
    return out


def read_mix(path: str | Path) -> Iterator[MixRequest]:
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                yield MixRequest(**{k: d[k] for k in MixRequest.__dataclass_fields__})
