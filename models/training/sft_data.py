"""Instruction data for the reference pair's chat tuning (models/training/sft.py) and its
benchmark (evals/bench/chat.py).

Two parts, both in the pair's chat format (:data:`CHAT_TEMPLATE`, the same text as the
plain ``User: ...\\n\\nAssistant:`` rendering), every answer followed by end-of-sequence:

- **real requests**: a fixed part of the shared request files, by a stable hash of the
  request id (:func:`in_sft_part`), never ``selfinstruct_user_eval.jsonl`` (evaluation
  only); the ids used and each file's sha256 go to ``models/reference/sft_data.json`` so
  labels and evals can leave them out;
- **synthetic instructions** cut from the reference corpus: copying (repeat a passage, fix a
  planted bug and return the whole function, rename a variable, reindent, extract lines)
  and fresh writing (continue a text, define a word, summarise a function in one line).
  Training cuts them from the corpus's ``train`` split only; the benchmark cuts them from
  ``val`` (held-out documents), with another seed.

A planted bug is one operator or constant changed in one direction (``+``→``-``,
``<``→``<=``, ``>``→``>=``, ``==``→``!=``, ``True``→``False``), at a site chosen so that
the buggy function holds exactly one occurrence of the planted token (the original has
none): the bug is determined by the text, so a model can learn to find it.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import random
import re
import textwrap
import tokenize
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REQUESTS_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "requests"
# as classifiers.realdata: evaluation-only (its authors ask that it is not trained on), and
# the names reserved for the independent held-out check (refused if present)
EVAL_ONLY_FILES = frozenset({"selfinstruct_user_eval.jsonl"})
RESERVED = ("arena", "gsm8k", "humaneval")
REAL_SHARE = 0.15  # share of each trainable request file used for tuning (by id hash)

# The chat template both tokenizers carry: the same text as models.base.plain_chat_prompt,
# so a backend without it renders a conversation exactly alike.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ m['role'] | capitalize }}: {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}")

BUG_SWAPS = {"+": "-", "<": "<=", ">": ">=", "==": "!=", "True": "False"}
NEW_NAMES = ("value", "item", "result", "data", "count", "node", "key", "total", "buf", "obj",
             "entry", "elem", "arg", "token", "chunk")

# synthetic task -> share of the synthetic examples (copying first, then fresh writing)
TASK_SHARES: dict[str, float] = {
    "repeat": 0.32, "fix_bug": 0.30, "rename": 0.06, "extract_lines": 0.05, "reindent": 0.04,
    "continue": 0.09, "define": 0.07, "summarise": 0.07,
}
COPY_TASKS = frozenset({"repeat", "repeat_long", "repeat_rare", "repeat_tokens", "fix_bug",
                        "rename", "extract_lines", "reindent"})
# Training-only variants (phase 6): "repeat_long" repeats 60-160-token passages (the length of
# the functions a fix returns); "continue_sentence" continues a text to the end of the
# sentence or line under way, so a continuation has a place to stop. The benchmark keeps
# "repeat" and "continue" as they were.
# Phase 7 (session 10): a held-out repeat fails where it meets a rare token (the expected
# token's probability is near 0 at the first wrong token; median train-corpus count of that
# token 79 against 650 for a fix's). "repeat_rare" repeats the passage with the most rare words
# of several drawn; "repeat_tokens" repeats a string of random vocabulary pieces, so every
# piece is a copy target, not only the ones the corpus's passages happen to hold.
RARE_WORD_COUNT = 20  # a word is rare below this many occurrences in the train split
RARE_CANDIDATES = 8
WORD = re.compile(r"\w+")
SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s)|\n")

REPEAT_PROMPTS = ("Repeat exactly: {p}", "Repeat exactly: {p}", "Repeat exactly:\n{p}",
                  "Repeat this text exactly:\n\n{p}", "Copy the following verbatim:\n{p}")
FIX_PROMPTS = ("Fix the bug in this function and return the whole corrected function:\n{f}",
               "Fix the bug in this function and return the whole corrected function: {f}",
               "Fix the bug in this function and return the whole corrected function:\n\n{f}",
               "This function has a bug. Return the whole corrected function.\n\n{f}",
               "Find and fix the bug:\n```python\n{f}\n```")


@dataclass
class Example:
    """One instruction: ``messages`` (role/content dicts, the last one the user's) and the
    ``answer`` the model is tuned to give; ``doc`` is the corpus document or request id."""

    id: str
    task: str
    messages: list[dict[str, str]]
    answer: str
    doc: str
    meta: dict = field(default_factory=dict)


def stable_unit(key: str) -> float:
    """A stable number in [0, 1) from a string (sha1), the same on every machine."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32


def in_sft_part(request_id: str, share: float = REAL_SHARE) -> bool:
    """True for the requests of the tuning part (the rest stays for labels and evals)."""
    return stable_unit("sft:" + request_id) < share


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def licences(requests_dir: Path) -> dict[str, str]:
    """file name -> licence, from the table in the data folder's README."""
    out = {}
    readme = requests_dir / "README.md"
    for m in re.finditer(r"^\| (\S+\.jsonl) \|[^|]*\|[^|]*\| ([^|]+?) \|", readme.read_text(), re.M):
        out[m.group(1)] = m.group(2)
    return out


def load_real_requests(requests_dir: Path = REQUESTS_DIR, share: float = REAL_SHARE,
                       fits: Callable[[Example], bool] | None = None) -> tuple[list[Example], dict]:
    """The tuning part of every trainable request file, and its record (file hashes, ids
    used, ids in the part that did not fit). Evaluation-only files are never read."""
    out: list[Example] = []
    record: dict = {"share": share, "rule": "sha1('sft:' + id)[:8] / 2**32 < share", "files": {}}
    lic = licences(requests_dir)
    for path in sorted(requests_dir.glob("*.jsonl")):
        if path.name in EVAL_ONLY_FILES:
            continue
        if any(r in path.name.lower() for r in RESERVED):
            raise ValueError(f"{path}: reserved for the independent held-out check; never tuned on")
        used, too_long = [], []
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if not in_sft_part(r["id"], share):
                continue
            msgs = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
            ex = Example(r["id"], "real:" + r.get("kind", "?"), msgs, r["reference"].strip(), r["id"])
            if fits is not None and not fits(ex):
                too_long.append(r["id"])
                continue
            used.append(r["id"])
            out.append(ex)
        record["files"][path.name] = {"sha256": sha256_file(path), "licence": lic.get(path.name, "?"),
                                      "used": len(used),
                                      "ids": used, "in_part_too_long": too_long}
    return out, record


# ---------------------------------------------------------------------------------------
# corpus pieces
# ---------------------------------------------------------------------------------------
def load_corpus(corpus: Path, split: str) -> list[dict]:
    """Documents of one corpus split ('train' or 'val'), as models.training.corpus wrote them."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    with open(Path(corpus) / f"{split}.jsonl") as fh:
        return [json.loads(line) for line in fh]


def python_functions(docs: list[dict], max_lines: int = 30) -> list[tuple[str, str, ast.AST]]:
    """(doc id, dedented source, parsed node) of each function of the code documents (no
    decorators; 2 to ``max_lines`` lines; re-parsed after dedenting)."""
    out: list[tuple[str, str, ast.AST]] = []
    for d in docs:
        if d["domain"] != "code":
            continue
        try:
            tree = ast.parse(d["text"])
        except (SyntaxError, ValueError):
            continue
        lines = d["text"].splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            end = node.end_lineno or node.lineno
            if not 2 <= end - node.lineno + 1 <= max_lines:
                continue
            src = textwrap.dedent("\n".join(lines[node.lineno - 1:end])).strip("\n")
            if "\t" in src:
                continue
            try:
                fn = ast.parse(src).body[0]
            except (SyntaxError, ValueError, IndexError):
                continue
            out.append((d["id"], src, fn))
    return out


def _tokens(src: str) -> list[tokenize.TokenInfo]:
    return list(tokenize.generate_tokens(io.StringIO(src).readline))


def _offset(src: str, row: int, col: int) -> int:
    starts = [0]
    for line in src.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts[row - 1] + col


def plant_bug(src: str, rng: random.Random) -> tuple[str, str] | None:
    """(buggy source, description) with one planted bug, or None when no site qualifies:
    the swap's target token must not occur in the original, so the buggy source holds it
    exactly once."""
    try:
        toks = _tokens(src)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    present = {t.string for t in toks if t.type in (tokenize.OP, tokenize.NAME)}
    sites = [t for t in toks if t.type in (tokenize.OP, tokenize.NAME) and t.string in BUG_SWAPS
             and BUG_SWAPS[t.string] not in present]
    if not sites:
        return None
    t = rng.choice(sites)
    off = _offset(src, *t.start)
    new = BUG_SWAPS[t.string]
    return src[:off] + new + src[off + len(t.string):], f"{t.string} -> {new}"


def rename_variable(src: str, fn: ast.AST, rng: random.Random) -> tuple[str, str, str] | None:
    """(renamed source, old, new): a parameter renamed at every use, or None."""
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    params = [a.arg for a in fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
    try:
        toks = _tokens(src)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    names = {t.string for t in toks if t.type == tokenize.NAME}
    rng.shuffle(params)
    for old in params:
        uses = [i for i, t in enumerate(toks) if t.type == tokenize.NAME and t.string == old]
        words = len(re.findall(rf"\b{re.escape(old)}\b", src))
        if len(old) < 2 or len(uses) < 2 or words != len(uses):
            continue  # also named inside strings or comments: ambiguous
        if any(i > 0 and toks[i - 1].string == "." for i in uses):
            continue  # an attribute of the same name
        new = rng.choice([n for n in NEW_NAMES if n not in names])
        out = src
        for i in reversed(uses):
            off = _offset(src, *toks[i].start)
            out = out[:off] + new + out[off + len(old):]
        return out, old, new
    return None


def reindent(src: str) -> str | None:
    """The function with half its indentation (4 spaces -> 2), or None if not 4-space."""
    lead = [len(x) - len(x.lstrip(" ")) for x in src.splitlines() if x.strip()]
    if not any(lead) or any(k % 4 for k in lead):
        return None
    return "\n".join(" " * ((len(x) - len(x.lstrip(" "))) // 2) + x.lstrip(" ")
                     for x in src.splitlines())


def strip_docstring(src: str, fn: ast.AST) -> tuple[str, str] | None:
    """(function without its docstring, the docstring's first line), or None."""
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or len(fn.body) < 2:
        return None
    first = fn.body[0]
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        return None
    summary = first.value.value.strip().split("\n")[0].strip()
    if not 3 <= len(summary.split()) <= 25:
        return None
    lines = src.splitlines()
    rest = lines[:first.lineno - 1] + lines[(first.end_lineno or first.lineno):]
    return "\n".join(rest), summary


def gcide_definitions(docs: list[dict]) -> Iterator[tuple[str, str, str]]:
    """(doc id, headword, first definition sentence) from the dictionary documents."""
    for d in docs:
        if d["domain"] != "dict":
            continue
        for entry in re.split(r"\n(?=\S)", d["text"]):
            head = entry.split(" ", 1)[0].strip()
            if not re.fullmatch(r"[A-Za-z][a-z]{2,}", head):
                continue
            body = re.sub(r"\[[^\]]*\]", " ", entry.split("\n", 1)[1] if "\n" in entry else "")
            body = re.sub(r"\s+", " ", body).strip()
            body = re.sub(r"^1\. ", "", body)
            m = re.match(r"([A-Z][^.{}\\\"]{8,160}?\.)(\s|$)", body)
            if m:
                yield d["id"], head, m.group(1)


# ---------------------------------------------------------------------------------------
# synthetic examples
# ---------------------------------------------------------------------------------------
class SyntheticBuilder:
    """Synthetic examples from one corpus split. ``count_tokens(text)`` measures lengths
    with the pair's tokenizer; ``rng`` makes every choice (same seed, same examples)."""

    def __init__(self, docs: list[dict], count_tokens: Callable[[str], int], seed: int,
                 max_function_tokens: int = 160, pieces: list[str] | None = None) -> None:
        self.rng = random.Random(seed)
        self.pieces = pieces or []  # the tokenizer's pieces, decoded (for repeat_tokens)
        self._words: Counter[str] | None = None
        self.count = count_tokens
        self.docs = [d for d in docs if len(d["text"]) >= 400]
        self.functions = [f for f in python_functions(docs)
                          if 12 <= count_tokens(f[1]) <= max_function_tokens]
        self.definitions = list(gcide_definitions(docs))
        self.n = 0

    def _example(self, task: str, prompt: str, answer: str, doc: str, **meta) -> Example:
        self.n += 1
        return Example(f"syn-{task}-{self.n:06d}", task, [{"role": "user", "content": prompt}],
                       answer, doc, meta)

    def passage(self, lo: int, hi: int) -> tuple[str, str] | None:
        """(doc id, a passage of lo..hi tokens starting and ending at a word boundary)."""
        d = self.rng.choice(self.docs)
        text = d["text"]
        start = self.rng.randrange(0, max(1, len(text) - 200))
        ws = re.search(r"\s\S", text[start:])
        if not ws:
            return None
        start += ws.start() + 1
        want = self.rng.randint(lo, hi)
        chunk = text[start:start + want * 6]
        words = re.findall(r"\S+\s*", chunk)
        out = ""
        for w in words:
            if self.count(out + w) > want:
                break
            out += w
        out = out.strip()
        if "\ufffd" in out or not lo <= self.count(out) <= hi:
            return None
        return d["id"], out

    def repeat(self, lo: int = 20, hi: int = 60, canonical: bool = False) -> Example | None:
        got = self.passage(lo, hi)
        if not got:
            return None
        form = REPEAT_PROMPTS[0] if canonical else self.rng.choice(REPEAT_PROMPTS)
        return self._example("repeat", form.format(p=got[1]), got[1], got[0],
                             tokens=self.count(got[1]))

    def fix_bug(self, canonical: bool = False) -> Example | None:
        doc, src, _ = self.rng.choice(self.functions)
        got = plant_bug(src, self.rng)
        if not got:
            return None
        form = (FIX_PROMPTS[self.n % 2] if canonical else self.rng.choice(FIX_PROMPTS))
        return self._example("fix_bug", form.format(f=got[0]), src, doc, bug=got[1],
                             buggy=got[0], tokens=self.count(src))

    def rename(self) -> Example | None:
        doc, src, fn = self.rng.choice(self.functions)
        got = rename_variable(src, fn, self.rng)
        if not got:
            return None
        return self._example("rename", f"Rename the variable `{got[1]}` to `{got[2]}` in this "
                             f"function:\n{src}", got[0], doc)

    def reindent(self) -> Example | None:
        doc, src, _ = self.rng.choice(self.functions)
        out = reindent(src)
        if not out:
            return None
        return self._example("reindent", f"Reindent this function with 2 spaces per level:\n{src}",
                             out, doc)

    def extract_lines(self) -> Example | None:
        d = self.rng.choice(self.docs)
        lines = [x.rstrip() for x in d["text"].splitlines()]
        n = self.rng.randint(6, 16)
        start = self.rng.randrange(0, max(1, len(lines) - n))
        block = [x for x in lines[start:start + n] if x.strip() and len(x) <= 120]
        if len(block) < 4:
            return None
        words = sorted({w for x in block for w in re.findall(r"[A-Za-z_]{4,}", x)})
        self.rng.shuffle(words)
        for w in words[:20]:
            hits = [x for x in block if w in x]
            if 1 <= len(hits) <= 4 and len(hits) < len(block):
                return self._example("extract_lines", f"Extract the lines that contain \"{w}\":\n"
                                     + "\n".join(block), "\n".join(hits), d["id"])
        return None

    def continue_(self) -> Example | None:
        got = self.passage(60, 200)
        if not got:
            return None
        words = re.findall(r"\S+\s*", got[1])
        cut = self.rng.randint(len(words) // 3, 2 * len(words) // 3)
        head, tail = "".join(words[:cut]).strip(), "".join(words[cut:]).strip()
        if self.count(tail) < 15:
            return None
        return self._example("continue", f"Continue this text:\n{head}", tail, got[0],
                             tokens=self.count(tail))

    def rare_words(self, text: str) -> int:
        """How many words of ``text`` occur fewer than RARE_WORD_COUNT times in the split."""
        if self._words is None:
            self._words = Counter(w for d in self.docs for w in WORD.findall(d["text"]))
        return sum(self._words[w] < RARE_WORD_COUNT for w in WORD.findall(text))

    def repeat_rare(self) -> Example | None:
        got = [p for p in (self.passage(20, 60) for _ in range(RARE_CANDIDATES)) if p]
        if not got:
            return None
        doc, text = max(got, key=lambda p: self.rare_words(p[1]))
        form = self.rng.choice(REPEAT_PROMPTS)
        return self._example("repeat_rare", form.format(p=text), text, doc,
                             tokens=self.count(text))

    def repeat_tokens(self, lo: int = 20, hi: int = 60) -> Example | None:
        if not self.pieces:
            return None
        text = "".join(self.rng.choice(self.pieces) for _ in range(self.rng.randint(lo, hi))).strip()
        if "\ufffd" in text or not lo <= self.count(text) <= hi:
            return None
        form = self.rng.choice(REPEAT_PROMPTS)
        return self._example("repeat_tokens", form.format(p=text), text, "vocabulary",
                             tokens=self.count(text))

    def repeat_long(self) -> Example | None:
        ex = self.repeat(60, 160)
        if ex:
            ex.task = "repeat_long"
        return ex

    def continue_sentence(self, min_tokens: int = 10) -> Example | None:
        got = self.passage(60, 200)
        if not got:
            return None
        words = re.findall(r"\S+\s*", got[1])
        cut = self.rng.randint(len(words) // 4, len(words) // 2)
        head, rest = "".join(words[:cut]).strip(), "".join(words[cut:])
        for m in SENTENCE_END.finditer(rest):
            tail = rest[:m.end()].strip()
            if self.count(tail) >= min_tokens:
                return self._example("continue_sentence", f"Continue this text:\n{head}", tail,
                                     got[0], tokens=self.count(tail))
        return None

    def define(self) -> Example | None:
        if not self.definitions:
            return None
        doc, word, sense = self.rng.choice(self.definitions)
        form = self.rng.choice(("What does \"{w}\" mean?", "Define the word {w}.",
                                "What is the meaning of {w}?"))
        return self._example("define", form.format(w=word.lower()), sense, doc)

    def summarise(self) -> Example | None:
        doc, src, fn = self.rng.choice(self.functions)
        got = strip_docstring(src, fn)
        if not got:
            return None
        return self._example("summarise", "Summarise in one line what this function does:\n"
                             + got[0], got[1], doc)

    def make(self, task: str) -> Example | None:
        method: dict[str, Callable[[], Example | None]] = {"repeat": self.repeat, "fix_bug": self.fix_bug, "rename": self.rename,
                  "reindent": self.reindent, "extract_lines": self.extract_lines,
                  "continue": self.continue_, "define": self.define,
                  "repeat_long": self.repeat_long, "repeat_rare": self.repeat_rare,
                  "repeat_tokens": self.repeat_tokens,
                  "continue_sentence": self.continue_sentence,
                  "summarise": self.summarise}
        return method[task]()

    def build(self, counts: dict[str, int], tries: int = 50) -> list[Example]:
        """``counts[task]`` examples of each task (fewer if the split runs out of sites),
        no two with the same prompt."""
        out: list[Example] = []
        seen: set[str] = set()
        for task, n in counts.items():
            got, misses = 0, 0
            while got < n and misses < tries * n:
                ex = self.make(task)
                key = ex.messages[-1]["content"] if ex else ""
                if ex is None or key in seen:
                    misses += 1
                    continue
                seen.add(key)
                out.append(ex)
                got += 1
        return out


def task_counts(total: int, shares: dict[str, float] = TASK_SHARES) -> dict[str, int]:
    """Examples per synthetic task for ``total`` synthetic examples."""
    norm = sum(shares.values())
    return {k: int(round(total * v / norm)) for k, v in shares.items()}
