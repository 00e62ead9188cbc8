"""Prompt-only request features: named, documented and computed in one place.

:data:`FEATURES` is the single list of features (name, group, meaning, why the study
suggests it matters); :func:`extract` and :func:`extract_batch` return values in exactly
that order. No model forward pass: byte histograms, ``bytes.count``, rolling hashes in
numpy, zlib and a bounded tree-sitter parse (:mod:`classifiers.structure`).

Cost: linear in prompt length, and the expensive parts are capped (hashing and compression
see the last ``REP_MAX_BYTES``, word statistics the last ``SEM_MAX_BYTES``, tree-sitter
``structure.TS_MAX_BYTES``), so a 2k-token prompt takes a few hundred microseconds.

Garbage in (empty, binary, a megabyte of one character, broken code) gives finite values;
:func:`extract` never raises on text.

Multi-turn requests: features are computed on the last user turn and on the rest of the
conversation and mixed ``LAST_USER_WEIGHT : 1 - LAST_USER_WEIGHT``; length and turn
features describe the whole conversation.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import cache
from typing import TypedDict

import numpy as np

from classifiers import lexicon, structure
from classifiers.request import RoutingRequest

REP_MAX_BYTES = 65536  # structure counts and the tail-repeat search see the last 64 KiB
HASH_MAX_BYTES = 16384  # repeated-span statistics see the last 16 KiB
MAX_STARTS = 512  # span starts hashed at most (a content-defined sample beyond that)
ZLIB_BYTES = 2048  # compression ratio of the last 2 KiB
SEM_MAX_BYTES = 2048  # word statistics see the last 2 KiB (~350 words)
CUE_BYTES = 600  # instruction cues are looked for in the first and last 600 characters
LAST_USER_WEIGHT = 0.7  # weight of the last user turn in multi-turn requests
REP_SHARES = (8, 32)  # span lengths (bytes) whose repeated share is a feature
REP_LADDER = (8, 32, 128, 512)  # span lengths searched for the longest repeat
TAIL_LADDER = (4, 8, 16, 32, 64, 128, 256)  # prompt-suffix lengths (bytes) for tail reuse


@dataclass(frozen=True)
class Feature:
    name: str
    group: str  # length | repetition | structure | semantics | cue
    meaning: str
    why: str


_COPY = "study: transformers copy verbatim runs; the hybrid's lead shrinks as a repeated run grows"
_BRK = "study: closing brackets favour the transformer in prose, code and markup"
_SEM = "study: meaning-bearing, context-dependent tokens favour the hybrid"

# Task cues: what the answer will be, from the instruction's words, in any phrasing. Matched
# as whole words (with -s/-ed/-ing forms) or phrases in the first and last CUE_BYTES characters
# of the last user turn; each feature counts the distinct cues present.
TASK_CUES: dict[str, tuple[str, ...]] = {
    "fix": ("fix", "bug", "bugs", "buggy", "debug", "repair", "correct", "corrected", "error",
            "broken", "wrong", "patch", "mistake"),
    "transform": ("rewrite", "rephrase", "paraphrase", "reword", "revise", "edit", "translate",
                  "convert", "port", "equivalent", "refactor", "reformat", "simplify", "shorten",
                  "modify", "change", "transform", "turn this", "turn the", "make it",
                  "improve"),
    "split_join": ("split", "break", "divide", "separate", "combine", "merge", "fuse", "join",
                   "into two", "into one", "single sentence", "shorter sentences", "sentences"),
    "extract": ("extract", "quote", "copy", "verbatim", "repeat", "exactly", "word for word",
                "from the text", "from the passage", "from the paragraph", "in the text",
                "in the passage", "according to", "based on", "given the", "the passage",
                "the text", "the paragraph", "the reference", "the context", "this text",
                "this paragraph", "taken from", "span", "mentioned"),
    "generate": ("write", "create", "generate", "compose", "draft", "implement", "design",
                 "story", "poem", "essay", "letter", "email", "tweet", "song", "imagine",
                 "invent", "describe", "explain", "why", "opinion", "think", "advice", "ideas",
                 "suggest", "recommend", "brainstorm", "tell me"),
    "list": ("list", "bullet", "bulleted", "steps", "enumerate", "examples", "names", "top",
             "ways", "tips", "comma", "separated", "table"),
    "math": ("solve", "calculate", "compute", "how many", "how much", "value", "probability",
             "percent", "percentage", "average", "sum", "total", "ratio", "equation", "area",
             "speed", "price", "cost", "profit", "rate", "options", "number"),
    "short": ("one word", "short answer", "briefly", "yes or no", "true or false", "classify",
              "which", "who", "when", "where", "name the", "identify", "choose", "pick",
              "select", "answer with", "only the"),
}
TASK_WHY: dict[str, str] = {
    "fix": "a fixed function or text is mostly the input again: " + _COPY,
    "transform": "rewrites, translations and ports re-emit the input's names and structure",
    "split_join": "split/fuse answers are the input's words re-arranged: " + _COPY,
    "extract": "the answer is a span of the given text: " + _COPY,
    "generate": "new, meaning-bearing text: " + _SEM,
    "list": "the answer's shape: lists repeat their own markers and patterns",
    "math": "worked answers repeat the problem's numbers and names",
    "short": "short answers: few tokens, often a span or an option of the prompt",
}
_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.S)
_OPTION = re.compile(r"(?m)^\s*\(?[A-Ea-e][).:]\s")
_TEST = re.compile(r"(?m)^\s*(?:assert\b|>>>|self\.assert|expect\(|test)")


FEATURES: tuple[Feature, ...] = (
    # --- length -----------------------------------------------------------------------
    Feature("chars_log", "length", "log(1 + characters in the conversation)",
            "the gap moves with context length (long-range recall vs fixed state)"),
    Feature("approx_tokens_log", "length",
            "log(1 + whitespace and punctuation characters), a tokenizer-free token count",
            "code and markup have more tokens per character than prose"),
    Feature("max_tokens_log", "length", "log(1 + max_tokens), 0 when the request gives none",
            "longer answers average the gap over more tokens"),
    Feature("has_max_tokens", "length", "1 when the request states max_tokens", "pairs with max_tokens_log"),
    Feature("turns", "length", "number of messages", "multi-turn chats carry more context to track"),
    Feature("last_user_share", "length", "share of characters in the last user turn",
            "how much of the context the current instruction is"),
    Feature("lines_log", "length", "log(1 + lines)", "line structure: code, lists, markup"),
    Feature("mean_line_len", "length", "characters per line / 100", "code and markup have short lines"),
    # --- repetition ---------------------------------------------------------------------
    *(Feature(f"rep_share_{k}", "repetition",
              f"share of word-start {k}-byte spans that occur more than once", _COPY)
      for k in REP_SHARES),
    Feature("longest_repeat_log", "repetition",
            "log2 of the longest repeated span (bytes, on the 8/32/128/512 ladder), 0 when none", _COPY),
    Feature("tail_repeat_log", "repetition",
            "log2 of the longest prompt suffix (4..256 bytes) that occurs earlier: the answer "
            "may be mid-copy", _COPY),
    Feature("tail_repeat_dist_log", "repetition",
            "log(1 + bytes back to that earlier occurrence), 0 when none",
            "fixed-state recall decays with distance; attention does not"),
    Feature("compress_ratio", "repetition", "zlib-compressed size / raw size (last 2 KiB)",
            "low ratio = redundant, repetitive text"),
    # --- structure ----------------------------------------------------------------------
    Feature("fenced_blocks", "structure", "number of ``` fenced blocks", "code to copy or edit"),
    Feature("indented_line_share", "structure", "share of lines starting with 4 spaces or a tab",
            "code and nested markup"),
    *(Feature(f"lang_{lang}", "structure",
              f"{lang} markers per 1k bytes (see structure.MARKERS)",
              "domain: the checked 7B pair differs most between code and books")
      for lang in structure.MARKERS),
    *(Feature(f"block_{lang}", "structure", f"1 when the parsed block is {lang}",
              "language of the code/markup block") for lang in structure.PARSED_LANGUAGES),
    Feature("ts_parsed", "structure", "1 when tree-sitter parsed a block", "code or markup present"),
    Feature("ts_nodes_per_byte", "structure", "syntax nodes per byte of the parsed window",
            "dense syntax: brackets, operators, delimiters"),
    Feature("ts_error_nodes", "structure", "ERROR nodes in the parsed window", "broken or cut-off code"),
    Feature("ts_missing_nodes", "structure", "MISSING nodes (e.g. a bracket the parser had to insert)", _BRK),
    Feature("ts_end_depth", "structure", "syntax-tree depth at the last byte", _BRK),
    Feature("open_bracket_density", "structure", "( [ { per byte", _BRK),
    Feature("close_bracket_density", "structure", ") ] } per byte", _BRK),
    Feature("bracket_max_depth", "structure", "deepest ( [ { nesting (capped at 64)", _BRK),
    Feature("bracket_end_depth", "structure", "brackets still open at the end (>= 0)",
            "the answer must close them: " + _BRK),
    Feature("bracket_unmatched_close", "structure", "closers with no opener (deepest negative dip)",
            "broken or partial code"),
    Feature("tags_unclosed", "structure", "HTML/XML tags opened minus closed (>= 0, capped)", _BRK),
    Feature("latex_env_unclosed", "structure", "\\begin{ minus \\end{ (>= 0, capped)", _BRK),
    Feature("angle_density", "structure", "< > per byte", "markup"),
    Feature("symbol_density", "structure", "ASCII punctuation per byte", "code, markup, data"),
    Feature("quote_density", "structure", "quote characters per byte", "strings, JSON, quotations"),
    Feature("digit_density", "structure", "digits per byte", "data, tables, numbers to copy"),
    Feature("upper_density", "structure", "uppercase letters per byte", "names, entities, constants"),
    Feature("nonascii_density", "structure", "non-ASCII bytes per byte", "other scripts, binary"),
    Feature("ends_mid_line", "structure", "1 when the prompt does not end with a newline",
            "a continuation picks up mid-line"),
    # --- semantics ----------------------------------------------------------------------
    Feature("alpha_word_share", "semantics", "share of whitespace tokens that are plain words",
            "prose vs code/data"),
    Feature("content_word_share", "semantics", "share of words not in the function-word list", _SEM),
    Feature("function_word_share", "semantics", "share of function words",
            "study: function words favour the hybrid less than content words"),
    Feature("pronoun_share", "semantics", "share of pronouns",
            "study: the hybrid's lead grows with pronoun resolution and entity tracking"),
    Feature("adverb_share", "semantics", "words ending in '-ly ' per word",
            "study: adverbs are especially hybrid-favoured"),
    Feature("there_share", "semantics", "share of 'there'", "study: existential 'there' favours the hybrid"),
    Feature("type_token_ratio", "semantics", "distinct / total words over the last 2 KiB",
            "lexical variety vs repetition"),
    Feature("mean_word_len", "semantics", "letters per word / 10", "technical vs plain prose"),
    Feature("sentence_len", "semantics", "words per sentence / 100", "narrative vs list/code"),
    Feature("question_share", "semantics", "question words and '?' per word", "open questions ask for meaning"),
    # --- instruction cues (head and tail of the last user turn) --------------------------
    Feature("copy_cue", "cue", "copy cues: quote, repeat, verbatim, extract, copy, exactly, ...",
            "the answer is a copy: " + _COPY),
    Feature("edit_cue", "cue", "edit cues: fix this code, rewrite, translate, convert, refactor, ...",
            "the answer re-emits most of the input with changes"),
    Feature("complete_cue", "cue", "completion cues: complete, finish, close the, continue, ...",
            "structure-closing answers: " + _BRK),
    Feature("explain_cue", "cue", "explain cues: explain, summarize, describe, why, meaning, ...",
            "new, meaning-bearing text: " + _SEM),
    # --- the task: will the answer re-emit the prompt's text? (last user turn) -------------
    *(Feature(f"task_{g}", "task", f"{g} cues in the instruction: {', '.join(TASK_CUES[g][:8])}, ...",
              TASK_WHY[g]) for g in TASK_CUES),
    Feature("payload_share", "task",
            "share of the last user turn in its largest block (a fenced block, or the longest "
            "blank-line-separated paragraph when there are several)",
            "a long attached text or code block is what an edit, fix or extraction answer copies"),
    Feature("payload_chars_log", "task", "log(1 + characters of that block), 0 when none", _COPY),
    Feature("payload_code", "task", "code-likeness of that block: ( ) { } ; = per character x 10",
            "code answers repeat identifiers and structure"),
    Feature("instruction_chars_log", "task",
            "log(1 + characters of the last user turn outside the block)",
            "a long instruction asks for new text; a short one around a block asks to transform it"),
    Feature("options_listed", "task", "answer options in the prompt (lines like 'A)', 'B.')",
            "multiple-choice answers reuse an option verbatim"),
    Feature("tests_listed", "task", "assert / test lines in the prompt (capped at 16)",
            "tests name the function and arguments the answer will repeat"),
    Feature("assistant_share", "task", "share of the conversation's characters in assistant turns",
            "earlier answers in the context are text the next answer can reuse"),
    Feature("ends_with_question", "task", "1 when the last user turn ends with '?'",
            "a question asks for new text, not a transformation"),
    Feature("prev_answer_chars_log", "task",
            "log(1 + characters of the last assistant turn), 0 in a one-turn request",
            "a follow-up ('now do it in C', 'shorten it') re-emits the previous answer"),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)

# --- word lists (lowercase) -------------------------------------------------------------
PRONOUNS = frozenset(
    b"i me my mine we us our ours you your yours he him his she her hers it its they them "
    b"their theirs this that these those who whom whose which himself herself itself "
    b"themselves".split())
# the closed-class list (lexicon.py, shared with the analysis), as the letter runs counted here
FUNCTION_WORDS = PRONOUNS | frozenset(w.encode() for w in lexicon.FUNCTION_WORDS if w.isalpha())
QUESTION_WORDS = frozenset(b"what why how who whom whose which when where".split())
COPY_CUES = lexicon.COPY_CUES
EDIT_CUES = ("fix this", "fix the", "rewrite", "translate", "convert", "refactor", "reformat",
             "edit", "rename", "correct the")
COMPLETE_CUES = ("complete", "finish", "close the", "close all", "continue", "fill in",
                 "implement")
EXPLAIN_CUES = ("explain", "summary", "summaries", "summarize", "summarise", "describe", "why",
                "meaning", "overview", "paraphrase", "in your own words", "what does", "discuss",
                "tell me about")


def _cue_index(groups: tuple[tuple[str, ...], ...]):
    """Lookup tables for the cue features: one-word cues and their inflected forms
    ("quoted", "repeats") -> (group, cue); multi-word cues as space-padded phrases."""
    single: dict[str, tuple[int, str]] = {}
    multi: list[tuple[int, str]] = []
    for g, cues in enumerate(groups):
        for c in cues:
            if " " in c:
                multi.append((g, f" {c} "))
            else:
                for suffix in ("", "s", "es", "d", "ed", "ing"):
                    single.setdefault(c + suffix, (g, c))
    return single, tuple(multi)


CUE_GROUPS = (COPY_CUES, EDIT_CUES, COMPLETE_CUES, EXPLAIN_CUES)
CUE_SINGLE, CUE_MULTI = _cue_index(CUE_GROUPS)
TASK_SINGLE, TASK_MULTI = _cue_index(tuple(TASK_CUES.values()))
_LETTERS = re.compile(r"[a-z]+")


def _powers(base: int, n: int) -> np.ndarray:
    """``base**i mod 2**32`` for i < n (uint32 arithmetic wraps), by doubling."""
    out = np.ones(n, np.uint32)
    m = 1
    with np.errstate(over="ignore"):
        while m < n:
            end = min(2 * m, n)
            out[m:end] = out[:end - m] * np.uint32(pow(base, m, 2**32))
            m = end
    return out


class _Tables(TypedDict):
    brk: np.ndarray  # int8: +1 for an opening bracket, -1 for a closing one
    space: np.ndarray  # bool: whitespace bytes
    boundary: np.ndarray  # bool: whitespace or punctuation
    pow: np.ndarray  # uint32 rolling-hash powers
    ipow: np.ndarray  # uint32 inverse powers
    words: bytes  # translate table: lowercase letters, everything else a space


@cache
def _tables() -> _Tables:
    """Byte lookup tables and rolling-hash powers (built once, on first use)."""
    cls = np.zeros(256, np.int8)
    for c in b"([{":
        cls[c] = 1
    for c in b")]}":
        cls[c] = -1
    space = np.zeros(256, bool)
    space[list(b" \t\n\r\f\v")] = True
    punct = np.zeros(256, bool)
    punct[list(b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")] = True
    boundary = space | punct
    # 32-bit rolling hashes (small tables and temporaries: cache-friendly); with ~1000 spans
    # per length a false repeat has probability ~1e-4
    base, inv = 1_000_003, pow(1_000_003, -1, 2**32)  # odd base: invertible mod 2**32
    p, q = _powers(base, HASH_MAX_BYTES + 1), _powers(inv, HASH_MAX_BYTES + 1)
    words = bytes(c + 32 if 65 <= c <= 90 else (32 if punct[c] or 48 <= c <= 57 else c)
                  for c in range(256))
    return {"brk": cls, "space": space, "boundary": boundary, "pow": p, "ipow": q,
            "words": words}


def _repetition(arr: np.ndarray, data: bytes) -> dict[str, float]:
    """rep_share_k, longest_repeat_log, tail_repeat_log, tail_repeat_dist_log, compress_ratio.

    ``arr`` is the window for span statistics, ``data`` the (longer) one for the tail search.

    Spans start at word starts (a byte after whitespace or punctuation), sampled by content
    down to about :data:`MAX_STARTS` (the same two leading bytes are always kept or always
    dropped, so both copies of a repeat stay comparable). One rolling-hash
    matrix (starts x span lengths) sorted once per column gives, for every span length on
    :data:`REP_LADDER`, which spans occur more than once.
    """
    t = _tables()
    n = len(arr)
    shares = dict.fromkeys(REP_SHARES, 0.0)
    longest = 0
    if n >= 2 * REP_LADDER[0]:
        boundary = t["boundary"][arr]
        starts = np.flatnonzero(~boundary[1:] & boundary[:-1]) + 1
        if not boundary[0]:
            starts = np.concatenate(([0], starts))
        if len(starts) > MAX_STARTS:  # content-defined sample: both copies of a span agree
            m = -(-len(starts) // MAX_STARTS)
            s1 = np.minimum(starts + 1, n - 1)
            starts = starts[(arr[starts].astype(np.int64) * 31 + arr[s1]) % m == 0]
        prefix = np.zeros(n + 1, np.uint32)
        ks = np.asarray(REP_LADDER)
        ends = starts[None, :] + ks[:, None]  # (span lengths, starts)
        valid = ends <= n
        with np.errstate(over="ignore"):
            np.cumsum(arr * t["pow"][:n], out=prefix[1:], dtype=np.uint32)
            h = (prefix[np.minimum(ends, n)] - prefix[starts]) * t["ipow"][starts]
            # spans running past the end get distinct values that cannot pair up
            h[~valid] = np.uint32(0x9E3779B9) * np.arange(1, (~valid).sum() + 1,
                                                           dtype=np.uint32)
        h.sort(axis=1)
        eq = h[:, 1:] == h[:, :-1]
        has = eq.any(axis=1)
        if has.any():
            longest = int(ks[np.flatnonzero(has)[-1]])
            for k in REP_SHARES:
                j = REP_LADDER.index(k)
                if has[j]:
                    dup = np.zeros(h.shape[1], bool)
                    dup[1:] |= eq[j]
                    dup[:-1] |= eq[j]
                    shares[k] = float(dup.sum() / max(valid[j].sum(), 1))
    tail = tail_dist = 0
    nd = len(data)
    for k in TAIL_LADDER:
        if 2 * k > nd:
            break
        pos = data.rfind(data[-k:], 0, nd - 1)
        if pos < 0:
            break
        tail, tail_dist = k, nd - (pos + k)
    ratio = len(zlib.compress(data[-ZLIB_BYTES:], 1)) / min(nd, ZLIB_BYTES) if nd else 1.0
    return {**{f"rep_share_{k}": v for k, v in shares.items()},
            "longest_repeat_log": math.log2(longest) if longest else 0.0,
            "tail_repeat_log": math.log2(tail) if tail else 0.0,
            "tail_repeat_dist_log": math.log1p(tail_dist),
            "compress_ratio": min(ratio, 2.0)}


def _cues(text: str, single=CUE_SINGLE, multi=CUE_MULTI, n_groups: int = len(CUE_GROUPS),
          head: int = CUE_BYTES) -> list[float]:
    s = (text[:head] + "\n" + text[-head:] if len(text) > 2 * head else text).lower()
    # distinct cues present as whole words, so "edit" does not fire on "edition" nor "copy"
    # on "copyright": one pass over the words, then the few multi-word phrases
    words = _LETTERS.findall(s)
    found: list[set[str]] = [set() for _ in range(n_groups)]
    for w in words:
        hit = single.get(w)
        if hit is not None:
            found[hit[0]].add(hit[1])
    joined = " " + " ".join(words) + " "
    for g, phrase in multi:
        if phrase in joined:
            found[g].add(phrase)
    return [float(len(f)) for f in found]


def _payload(text: str) -> str:
    """The largest block of the last user turn: the longest fenced block, else the longest
    blank-line-separated paragraph when there are at least two (else '')."""
    fenced = _FENCE.findall(text[:REP_MAX_BYTES])
    if fenced:
        return max(fenced, key=len)
    paras = [p for p in re.split(r"\n\s*\n", text[:REP_MAX_BYTES]) if p.strip()]
    return max(paras, key=len) if len(paras) >= 2 else ""


def _task(request: RoutingRequest) -> dict[str, float]:
    """The ``task`` group: cues, the attached block, options, tests, earlier answers."""
    last = request.last_user
    cues = _cues(last, TASK_SINGLE, TASK_MULTI, len(TASK_CUES), head=300)
    block = _payload(last)
    nb, nl = len(block), max(len(last), 1)
    code = sum(block.count(c) for c in "(){};=") / max(nb, 1) * 10 if nb else 0.0
    total = sum(len(m.content) for m in request.messages) or 1
    assistant = sum(len(m.content) for m in request.messages if m.role == "assistant")
    return {**{f"task_{g}": v for g, v in zip(TASK_CUES, cues, strict=True)},
            "payload_share": nb / nl,
            "payload_chars_log": math.log1p(nb),
            "payload_code": min(code, 10.0),
            "instruction_chars_log": math.log1p(max(nl - nb, 0)),
            "options_listed": float(min(len(_OPTION.findall(last[:REP_MAX_BYTES])), 16)),
            "tests_listed": float(min(len(_TEST.findall(last[:REP_MAX_BYTES])), 16)),
            "assistant_share": assistant / total,
            "ends_with_question": float(last.rstrip().endswith("?")),
            "prev_answer_chars_log": math.log1p(next(
                (len(m.content) for m in reversed(request.messages) if m.role == "assistant"), 0))}


_SEMANTICS = ("alpha_word_share", "content_word_share", "function_word_share", "pronoun_share",
              "adverb_share", "there_share", "type_token_ratio", "mean_word_len",
              "sentence_len", "question_share")


def _semantics(data: bytes) -> dict[str, float]:
    """alpha_word_share ... question_share, over the last :data:`SEM_MAX_BYTES`."""
    t = _tables()
    data = data[-SEM_MAX_BYTES:]
    tokens = data.split()
    alpha = data.translate(t["words"]).split()  # lowercase letter runs (digits, punctuation dropped)
    nw = len(alpha)
    if not nw:
        return dict.fromkeys(_SEMANTICS, 0.0)
    counts = Counter(alpha)
    get = counts.get
    keys = counts.keys()
    func = sum(map(counts.__getitem__, keys & FUNCTION_WORDS))
    pron = sum(map(counts.__getitem__, keys & PRONOUNS))
    ques = sum(map(counts.__getitem__, keys & QUESTION_WORDS)) + data.count(b"?")
    recent = alpha
    sentences = data.count(b". ") + data.count(b".\n") + data.count(b"? ") + data.count(b"! ") + 1
    return {"alpha_word_share": sum(map(bytes.isalpha, tokens)) / max(len(tokens), 1),
            "content_word_share": (nw - func) / nw,
            "function_word_share": func / nw,
            "pronoun_share": pron / nw,
            "adverb_share": data.count(b"ly ") / nw,
            "there_share": get(b"there", 0) / nw,
            "type_token_ratio": len(set(recent)) / len(recent),
            "mean_word_len": sum(map(len, recent)) / len(recent) / 10,
            "sentence_len": min(nw / sentences / 100, 5.0),
            "question_share": ques / nw}


def _text_features(text: str) -> tuple[float, dict[str, float]]:
    """(approximate token count, the features of one text by name: every group but length
    (except ``lines_log`` and ``mean_line_len``) and task).

    Structure counts see the last :data:`REP_MAX_BYTES`; approximate tokens are whitespace
    plus punctuation characters, scaled to the whole text.
    """
    t = _tables()
    data = text.encode("utf-8", "replace")
    n = len(data)
    rep_data = data[-REP_MAX_BYTES:]
    arr = np.frombuffer(rep_data, np.uint8)
    hist = np.bincount(arr, minlength=256).astype(np.float64)
    m = max(len(arr), 1)
    lines = hist[10] + 1
    scores = structure.marker_scores(rep_data)
    block, n_fenced = structure.pick_block(text[-REP_MAX_BYTES:], rep_data, scores)
    ps = structure.parse_stats(block)
    depth = np.cumsum(t["brk"][arr], dtype=np.int32) if len(arr) else np.zeros(1, np.int32)
    opens = hist[40] + hist[91] + hist[123]
    closes = hist[41] + hist[93] + hist[125]
    close_tags = rep_data.count(b"</")
    tags = hist[60] - 2 * close_tags - rep_data.count(b"<!") - rep_data.count(b"/>")
    latex = rep_data.count(b"\\begin{") - rep_data.count(b"\\end{")
    punct = hist[33:48].sum() + hist[58:65].sum() + hist[91:97].sum() + hist[123:127].sum()
    approx_tokens = (hist[32] + hist[10] + hist[9] + punct) * n / m
    block_lang = block.language if block is not None else ""
    return approx_tokens, {
        "lines_log": math.log1p(lines),
        "mean_line_len": min(m / lines / 100, 50.0),
        **_repetition(arr[-HASH_MAX_BYTES:], rep_data),
        "fenced_blocks": float(n_fenced),
        "indented_line_share": (rep_data.count(b"\n    ") + rep_data.count(b"\n\t")) / lines,
        **{f"lang_{lang}": min(v, 1000.0) for lang, v in scores.items()},
        **{f"block_{lang}": float(block_lang == lang) for lang in structure.PARSED_LANGUAGES},
        "ts_parsed": ps.parsed,
        "ts_nodes_per_byte": min(ps.nodes_per_byte, 10.0),
        "ts_error_nodes": ps.error_nodes,
        "ts_missing_nodes": ps.missing_nodes,
        "ts_end_depth": ps.end_depth,
        "open_bracket_density": opens / m,
        "close_bracket_density": closes / m,
        "bracket_max_depth": float(min(depth.max(), 64)),
        "bracket_end_depth": float(min(max(depth[-1], 0), 64)),
        "bracket_unmatched_close": float(min(max(-depth.min(), 0), 64)),
        "tags_unclosed": float(min(max(tags, 0), 64)),
        "latex_env_unclosed": float(min(max(latex, 0), 64)),
        "angle_density": (hist[60] + hist[62]) / m,
        "symbol_density": punct / m,
        "quote_density": (hist[34] + hist[39] + hist[96]) / m,
        "digit_density": hist[48:58].sum() / m,
        "upper_density": hist[65:91].sum() / m,
        "nonascii_density": hist[128:].sum() / m,
        "ends_mid_line": float(not data.endswith(b"\n")),
        **_semantics(data),
        **dict(zip(("copy_cue", "edit_cue", "complete_cue", "explain_cue"), _cues(text),
                   strict=True)),
    }


def named(request: RoutingRequest) -> dict[str, float]:
    """Every feature of one request by name (each computed and named in one place: the
    group functions above return dicts, never positional lists)."""
    msgs = request.messages
    full = request.text
    last = request.last_user
    i_last = max((i for i, m in enumerate(msgs) if m.role == "user"), default=-1)
    f: dict[str, float]
    if len(msgs) > 1 and i_last >= 0 and last and len(last) < len(full):
        rest = "\n\n".join(m.content for i, m in enumerate(msgs) if i != i_last)
        tok_last, f_last = _text_features(last)
        tok_rest, f_rest = _text_features(rest)
        tokens = tok_last + tok_rest
        w = LAST_USER_WEIGHT
        f = {k: w * v + (1 - w) * f_rest[k] for k, v in f_last.items()}
    else:
        tokens, f = _text_features(full)
    values = {
        "chars_log": math.log1p(len(full)),
        "approx_tokens_log": math.log1p(tokens),
        "max_tokens_log": math.log1p(min(request.max_tokens or 0, 2**31)),
        "has_max_tokens": float(request.max_tokens is not None),
        "turns": float(len(msgs)),
        "last_user_share": len(last) / max(len(full), 1),
        **f, **_task(request)}
    return values


def extract(request: RoutingRequest) -> np.ndarray:
    """Feature vector (float64, shape ``(len(FEATURES),)``, in :data:`FEATURE_NAMES` order)
    for one request; always finite."""
    values = named(request)
    out = np.array([values[n] for n in FEATURE_NAMES], dtype=np.float64)
    if not np.isfinite(out).all():
        out = np.nan_to_num(out, nan=0.0, posinf=1e6, neginf=-1e6)
    return out


TASK_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.group == "task")


def extract_task(request: RoutingRequest) -> np.ndarray:
    """Only the ``task`` group (:data:`TASK_NAMES`, the same values :func:`extract` gives
    them): what a model that uses no other group needs, at a fraction of the cost."""
    values = _task(request)
    out = np.array([values[n] for n in TASK_NAMES], dtype=np.float64)
    if not np.isfinite(out).all():
        out = np.nan_to_num(out, nan=0.0, posinf=1e6, neginf=-1e6)
    return out


def extract_batch(requests: list[RoutingRequest]) -> np.ndarray:
    """Feature matrix, shape ``(len(requests), len(FEATURES))``."""
    if not requests:
        return np.zeros((0, len(FEATURES)))
    return np.stack([extract(r) for r in requests])


def markdown_table() -> str:
    """The feature list as a Markdown table (docs/classifier.md is generated from it)."""
    rows = ["| feature | group | meaning | why it matters |", "| --- | --- | --- | --- |"]
    rows += [f"| `{f.name}` | {f.group} | {f.meaning.replace('|', '/')} | {f.why} |"
             for f in FEATURES]
    return "\n".join(rows)
