"""Token categories shared by the token-level analysis and the request classifier.

Everything here is cheap, deterministic and offline (no model pass):

- word class of each token: ``content`` / ``function`` (closed-class English words, from
  the list below) / ``number`` / ``punct`` (punctuation and symbols) / ``whitespace`` /
  ``identifier`` and ``keyword`` (in code) / ``markup`` (tag and attribute names, TeX
  control words) / ``special`` (tokens with no text, e.g. EOS);
- whether a token starts a word (a subword continuation does not);
- repeated n-gram completion: the longest n such that the n tokens ending at i occurred
  earlier in the same sequence (online suffix automaton, O(n) amortised);
- distance (tokens) to the previous occurrence of the same token, and local reuse;
- bracket role (``open`` / ``close``) and kind (``()``, ``[]``, ``{}``, ``<>``, ``tag``).
  In code and markup a tree-sitter parse tells real delimiters from brackets inside
  strings and comments; prose falls back to a character scan.

Word classes use a closed-class function-word list rather than a POS tagger: NLTK's and
spaCy's English models need downloads this project cannot make offline, and the study's
headline contrast is open class vs closed class, which a closed list captures exactly.
A tagger can be plugged in later as an optional refinement of ``content``.

Text-level work happens per document on characters (:func:`char_categories`); a
tokenizer's character offsets then map it to tokens (:func:`token_categories`).
"""

from __future__ import annotations

import keyword
import re
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from classifiers import grammars
from classifiers.lexicon import FUNCTION_WORDS

# the closed-class list lives in classifiers/lexicon.py (shared with the request features)


WORD_CLASSES = ("content", "function", "number", "punct", "whitespace", "identifier",
                "keyword", "markup", "special")
BRACKET_KINDS = ("()", "[]", "{}", "<>", "tag")
_OPEN = {"(": "()", "[": "[]", "{": "{}"}
_CLOSE = {")": "()", "]": "[]", "}": "{}"}

# region codes (per character)
PROSE, CODE, MARKUP, SKIP = 0, 1, 2, 3  # SKIP: inside strings/comments of code (prose words)

_JS_KEYWORDS = frozenset("""break case catch class const continue debugger default delete do
else export extends false finally for function if import in instanceof let new null return
super switch this throw true try typeof undefined var void while with yield async await of
static get set""".split())
_C_KEYWORDS = frozenset("""auto break case char const continue default do double else enum
extern float for goto if inline int long register restrict return short signed sizeof static
struct switch typedef union unsigned void volatile while NULL define include ifdef ifndef
endif""".split())
KEYWORDS: dict[str, frozenset[str]] = {
    "python": frozenset(keyword.kwlist) | frozenset(keyword.softkwlist),
    "javascript": _JS_KEYWORDS, "json": frozenset({"true", "false", "null"}), "c": _C_KEYWORDS,
}

# domain (or file extension) -> parse language; anything else is prose
LANGUAGES: dict[str, str] = {
    "code": "python", "python": "python", "py": "python",
    "javascript": "javascript", "js": "javascript", "mjs": "javascript", "cjs": "javascript",
    "json": "json", "c": "c", "h": "c", "html": "html", "htm": "html",
    "markdown": "markdown", "md": "markdown", "tex": "tex", "latex": "tex", "sty": "tex",
}


def language_for(domain: str) -> str:
    """The parse language for a domain name or file extension ('prose' when unknown)."""
    return LANGUAGES.get(domain.lower().lstrip("."), "prose")


@cache
def _parser(lang: str):
    """A tree-sitter parser for ``lang`` (None when there is no grammar for it)."""
    grammar = grammars.language(lang)
    if grammar is None:
        return None
    from tree_sitter import Parser

    return Parser(grammar)


# ---------------------------------------------------------------------------------------
# characters: region and bracket role per character of a document
# ---------------------------------------------------------------------------------------
@dataclass
class CharCategories:
    """Per-character arrays for one text (length ``len(text)``).

    ``region``: PROSE / CODE / MARKUP / SKIP (string or comment inside code);
    ``bracket``: 0 none, +1 opening, -1 closing; ``kind``: index into BRACKET_KINDS (-1 none).
    """

    region: np.ndarray
    bracket: np.ndarray
    kind: np.ndarray

    def set_bracket(self, i: int, role: int, kind: str) -> None:
        self.bracket[i] = role
        self.kind[i] = BRACKET_KINDS.index(kind)


def _scan_brackets(text: str, cc: CharCategories, lo: int, hi: int, tex: bool = False,
                   shift: int = 0) -> None:
    """Character scan for ()[]{} in text[lo:hi] (written to cc at i + shift); in TeX skip
    % comments and escapes."""
    i = lo
    while i < hi:
        ch = text[i]
        if tex and ch == "\\" and i + 1 < hi:
            nxt = text[i + 1]
            if nxt in "()[]":  # \( \) \[ \] are math delimiters
                cc.set_bracket(i + 1 + shift, 1 if nxt in "([" else -1, "()" if nxt in "()" else "[]")
            i += 2
            continue
        if tex and ch == "%":
            j = text.find("\n", i, hi)
            j = hi if j < 0 else j
            cc.region[i + shift:j + shift] = SKIP
            i = j
            continue
        if ch in _OPEN:
            cc.set_bracket(i + shift, 1, _OPEN[ch])
        elif ch in _CLOSE:
            cc.set_bracket(i + shift, -1, _CLOSE[ch])
        i += 1


def _byte_to_char(text: str) -> np.ndarray | None:
    """Map byte offsets of ``text.encode()`` to character offsets (None when ASCII)."""
    data = text.encode("utf-8")
    if len(data) == len(text):
        return None
    b = np.frombuffer(data, dtype=np.uint8)
    starts = (b & 0xC0) != 0x80
    return np.concatenate([np.cumsum(starts) - 1, [len(text)]])


_STRINGY = ("string", "comment", "template_string", "raw_text", "char_literal",
            "string_literal", "system_lib_string", "heredoc")


def _parse_code(text: str, lang: str, cc: CharCategories, lo: int = 0) -> bool:
    """Tree-sitter pass over a code/markup snippet placed at ``lo`` in the document.

    Real delimiters are anonymous leaf nodes of type ( ) [ ] { }; strings and comments
    are SKIP regions (no bracket roles, prose words). HTML: ``<`` / ``>`` of tags are
    ``<>`` brackets, an end tag's ``</`` and a self-closing ``/>`` close a ``tag``, tag and
    attribute names are MARKUP, text nodes are prose scanned for brackets. Returns False
    when no parser is available.
    """
    parser = _parser(lang)
    if parser is None:
        return False
    tree = parser.parse(text.encode("utf-8"))
    b2c = _byte_to_char(text)

    def span(node) -> tuple[int, int]:
        s, e = node.start_byte, node.end_byte
        if b2c is not None:
            s, e = int(b2c[s]), int(b2c[e])
        return lo + s, lo + e

    if lang != "html":
        cc.region[lo:lo + len(text)] = CODE
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        t = node.type
        s, e = span(node)
        if lang == "html":
            if t in ("text", "raw_text"):
                _scan_brackets(text, cc, s - lo, e - lo, shift=lo)
                continue
            if t in ("comment", "doctype", "attribute_value"):
                cc.region[s:e] = SKIP if t == "comment" else MARKUP
                continue
            if t in ("tag_name", "attribute_name"):
                cc.region[s:e] = MARKUP
            elif t == "<" and e - s == 1:
                cc.set_bracket(s, 1, "tag")
            elif t == ">":
                cc.set_bracket(s, -1, "<>")
            elif t in ("</", "/>"):
                cc.region[s:e] = MARKUP
                cc.bracket[s:e] = -1
                cc.kind[s:e] = BRACKET_KINDS.index("tag")
        else:
            if t in ("interpolation", "template_substitution"):
                cc.region[s:e] = CODE  # f-string / template interpolations are code again
            elif node.is_named and any(k in t for k in _STRINGY):
                cc.region[s:e] = SKIP
            if not node.is_named and node.child_count == 0:
                if t in _OPEN:
                    cc.set_bracket(s, 1, _OPEN[t])
                elif t in _CLOSE:
                    cc.set_bracket(s, -1, _CLOSE[t])
        stack.extend(node.children)
    return True


def _markdown(text: str, cc: CharCategories) -> None:
    """Markdown: fenced code blocks parsed in their language; the rest scanned as prose."""
    parser = _parser("markdown")
    fences: list[tuple[int, int, str]] = []
    if parser is not None:
        b2c = _byte_to_char(text)
        tree = parser.parse(text.encode("utf-8"))
        stack = [tree.root_node]
        while stack:
            node = stack.pop()
            if node.type == "fenced_code_block":
                info = ""
                body = None
                for c in node.children:
                    if c.type == "info_string":
                        info = c.text.decode("utf-8", "replace").split()[0] if c.text.strip() else ""
                    elif c.type == "code_fence_content":
                        body = c
                if body is not None:
                    s, e = body.start_byte, body.end_byte
                    if b2c is not None:
                        s, e = int(b2c[s]), int(b2c[e])
                    fences.append((s, e, info))
                continue
            stack.extend(node.children)
    pos = 0
    for s, e, info in sorted(fences):
        _scan_brackets(text, cc, pos, s)
        lang = language_for(info) if info else "prose"
        if lang in ("python", "javascript", "json", "c"):
            _parse_code(text[s:e], lang, cc, lo=s)
        else:
            cc.region[s:e] = CODE
            _scan_brackets(text, cc, s, e)
        pos = e
    _scan_brackets(text, cc, pos, len(text))


def char_categories(text: str, lang: str) -> CharCategories:
    """Region and bracket role of every character of ``text`` parsed as ``lang``."""
    n = len(text)
    cc = CharCategories(np.zeros(n, np.int8), np.zeros(n, np.int8), np.full(n, -1, np.int8))
    if lang == "markdown":
        _markdown(text, cc)
    elif lang == "tex":
        _scan_brackets(text, cc, 0, n, tex=True)
    elif lang == "prose" or not _parse_code(text, lang, cc):
        _scan_brackets(text, cc, 0, n)
    return cc


# ---------------------------------------------------------------------------------------
# words and tokens
# ---------------------------------------------------------------------------------------
# words and identifiers (letters, digits, _, inner apostrophes) | numbers; TeX adds \controlwords
_WORD = re.compile(r"[^\W\d]\w*(?:'[^\W\d_]+)*|\d+(?:[.,]\d+)*")
_TEX_WORD = re.compile(r"\\[A-Za-z@]+|" + _WORD.pattern)


@dataclass
class TokenCategories:
    """Per-token arrays (length = number of tokens). ``word_class`` holds strings."""

    word_class: np.ndarray
    word_start: np.ndarray
    bracket: np.ndarray  # "open" / "close" / ""
    bracket_kind: np.ndarray  # one of BRACKET_KINDS or ""


def _word_classes(text: str, cc: CharCategories, lang: str) -> tuple[np.ndarray, list[str]]:
    """Per-character word index (-1 outside words) and the class of each word."""
    wid = np.full(len(text), -1, np.int64)
    classes: list[str] = []
    kws = KEYWORDS.get(lang, frozenset())
    for k, m in enumerate((_TEX_WORD if lang == "tex" else _WORD).finditer(text)):
        s, e = m.span()
        w = m.group()
        wid[s:e] = k
        region = int(cc.region[s])
        if w[0].isdigit():
            cls = "number"
        elif w[0] == "\\" or region == MARKUP:
            cls = "markup"
        elif region == CODE:
            cls = "keyword" if w in kws else "identifier"
        else:
            cls = "function" if w.lower() in FUNCTION_WORDS else "content"
        classes.append(cls)
    return wid, classes


def token_categories(text: str, offsets: Sequence[tuple[int, int]] | np.ndarray,
                     lang: str) -> TokenCategories:
    """Categories of tokens given by character ``offsets`` (start, end) into ``text``
    (pairs, or an (n, 2) array).

    A token takes the class of the first word it overlaps; it starts a word when it holds
    that word's first character (tokens without letters or digits count as word starts).
    Its bracket role is that of the last bracket character it holds.
    """
    cc = char_categories(text, lang)
    wid, classes = _word_classes(text, cc, lang)
    n = len(text)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    s = np.clip(off[:, 0], 0, n)
    e = np.clip(off[:, 1], 0, n)
    # next word char at or after i; last bracket char at or before i
    idx = np.arange(n + 1)
    is_word = np.concatenate([wid >= 0, [True]])
    next_word = np.minimum.accumulate(np.where(is_word, idx, n + 1)[::-1])[::-1]
    has_br = np.concatenate([[True], cc.bracket != 0])
    prev_br = np.maximum.accumulate(np.where(has_br, idx, 0)) - 1  # char index, -1 none
    space = np.concatenate([[0], np.cumsum([not c.isspace() for c in text])])

    nw = next_word[s]
    in_tok = nw < e
    word = np.where(in_tok, wid[np.minimum(nw, n - 1)] if n else 0, -1)
    cls_arr = np.asarray(classes + ["punct"], dtype=object)
    word_class = np.where(in_tok, cls_arr[word], "punct").astype(object)
    word_class[(space[e] - space[s]) == 0] = "whitespace"
    word_class[e <= s] = "special"
    # word start: the char before the word's first char in this token is not a word char
    first = np.minimum(nw, n - 1)
    word_start = ~in_tok | (first == 0) | (np.concatenate([[-1], wid])[first] != word)
    pb = prev_br[np.maximum(e, 1)] if n else np.full(len(s), -1)
    has = (pb >= s) & (e > s)
    pbc = np.clip(pb, 0, max(n - 1, 0))
    role = np.where(has, cc.bracket[pbc] if n else 0, 0)
    kind = np.where(has, cc.kind[pbc] if n else -1, -1)
    bracket = np.where(role > 0, "open", np.where(role < 0, "close", "")).astype(object)
    kinds = np.asarray([*BRACKET_KINDS, ""], dtype=object)
    return TokenCategories(word_class, word_start.astype(bool), bracket, kinds[kind])


# ---------------------------------------------------------------------------------------
# sequences of token ids: repeats, distances, reuse
# ---------------------------------------------------------------------------------------
def repeat_lengths(ids: Sequence[int]) -> np.ndarray:
    """Longest n such that ids[i-n+1 .. i] occurs earlier, ending before i (0: ids[i] new).

    An online suffix automaton over ids[:i]: the extension step walks suffix links from
    the last state until a state with a transition on ids[i]; that state's length + 1 is
    the answer (the longest suffix of ids[:i+1] occurring in ids[:i]). O(n) amortised.
    """
    nxt: list[dict[int, int]] = [{}]
    link = [-1]
    length = [0]
    last = 0
    out = np.zeros(len(ids), dtype=np.int32)
    for i, c in enumerate(ids):
        cur = len(length)
        nxt.append({})
        length.append(length[last] + 1)
        link.append(0)
        p = last
        while p != -1 and c not in nxt[p]:
            nxt[p][c] = cur
            p = link[p]
        if p == -1:
            out[i] = 0
        else:
            out[i] = length[p] + 1
            q = nxt[p][c]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(length)
                nxt.append(dict(nxt[q]))
                length.append(length[p] + 1)
                link.append(link[q])
                while p != -1 and nxt[p].get(c) == q:
                    nxt[p][c] = clone
                    p = link[p]
                link[q] = clone
                link[cur] = clone
        last = cur
    return out


def previous_distance(ids: Sequence[int]) -> np.ndarray:
    """Tokens back to the previous occurrence of the same id (-1 when none)."""
    seen: dict[int, int] = {}
    out = np.full(len(ids), -1, dtype=np.int64)
    for i, c in enumerate(ids):
        j = seen.get(c)
        if j is not None:
            out[i] = i - j
        seen[c] = i
    return out


def local_reuse(ids: Sequence[int], span: int = 128) -> np.ndarray:
    """How many of the previous ``span`` tokens equal ids[i] (local reuse)."""
    counts: Counter[int] = Counter()
    window: deque[int] = deque()
    out = np.zeros(len(ids), dtype=np.int32)
    for i, c in enumerate(ids):
        out[i] = counts[c]
        window.append(c)
        counts[c] += 1
        if len(window) > span:
            counts[window.popleft()] -= 1
    return out
