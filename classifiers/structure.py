"""Code and markup structure of a prompt: language guess and a bounded tree-sitter parse.

Used by :mod:`classifiers.features`. Everything here is cheap on purpose: the language guess
is a handful of ``bytes.count`` calls, and tree-sitter only ever sees the last
``TS_MAX_BYTES`` of one block (the part nearest the answer), so the parse costs a bounded
~0.05-0.1 ms whatever the prompt length. Grammars come from the per-language wheels
(``tree-sitter-python``, ``-javascript``, ``-c``, ``-html``, ``-json``), which work
offline; LaTeX, reST and Markdown are recognised by markers only.

tree-sitter is imported on first use, never at import time.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from classifiers import grammars

TS_MAX_BYTES = 384  # tree-sitter input cap (bytes): bounds parse cost per request
PARSED_LANGUAGES = ("python", "javascript", "c", "html", "json")
LANGUAGES = (*PARSED_LANGUAGES, "latex", "markdown", "rest", "prose")

# Marker substrings per language; a language's score is its marker count per 1k bytes.
MARKERS: dict[str, tuple[bytes, ...]] = {
    "python": (b"def ", b"self.", b"):\n", b"import "),
    "javascript": (b"function(", b"function (", b"const ", b"=>", b"});"),
    "c": (b"#include", b"\nint ", b"\nstatic ", b"(void", b"};\n"),
    "html": (b"</", b"<div", b"href=", b"<li"),
    "json": (b'": ', b'{"', b'",\n', b"null"),
    "latex": (b"\\begin{", b"\\end{", b"\\item", b"\\\\"),
    "markdown": (b"\n## ", b"](", b"```", b"\n* "),
    "rest": (b"\n.. ", b"::\n", b":`", b"``"),
}
MARKER_BYTES = 1024  # markers are counted over the last 1 KiB (the part nearest the answer)
MIN_MARKER_SCORE = 2.0  # markers per 1k bytes below which the text counts as prose
RAW_PARSE_RATIO = 2.0  # unfenced text is parsed only when its language leads 2:1

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_FENCE_ALIASES = {
    "py": "python", "python3": "python", "js": "javascript", "ts": "javascript",
    "typescript": "javascript", "jsx": "javascript", "node": "javascript", "cpp": "c",
    "c++": "c", "h": "c", "java": "c", "rust": "c", "go": "c", "htm": "html", "xml": "html",
    "tex": "latex", "md": "markdown", "rst": "rest",
}


@dataclass
class Block:
    """The code/markup block the parse looks at: its language and its text (bytes)."""

    language: str
    data: bytes
    fenced: bool


def marker_scores(data: bytes) -> dict[str, float]:
    """Markers per 1k bytes (over the last :data:`MARKER_BYTES`) for each language."""
    data = data[-MARKER_BYTES:]
    scale = 1000.0 / max(len(data), 1)
    return {lang: scale * sum(map(data.count, marks)) for lang, marks in MARKERS.items()}


def guess_language(scores: dict[str, float]) -> str:
    """The language with the highest marker score, or ``"prose"`` below the floor."""
    lang, best = max(scores.items(), key=lambda kv: kv[1])
    return lang if best >= MIN_MARKER_SCORE else "prose"


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(info-string language, body)`` for each Markdown fenced block (an unclosed last
    fence runs to the end of the text)."""
    if "```" not in text:
        return []
    return [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]


def pick_block(text: str, data: bytes, scores: dict[str, float]) -> tuple[Block | None, int]:
    """The block to parse (the last fenced block, else the whole prompt when it looks like
    code or markup) and the number of fenced blocks."""
    blocks = fenced_blocks(text)
    if blocks:
        info, body = blocks[-1]
        body_b = body.encode("utf-8", "replace")
        lang = _FENCE_ALIASES.get(info, info)
        if lang not in LANGUAGES:
            lang = guess_language(marker_scores(body_b[-4 * TS_MAX_BYTES:]))
        return Block(lang, body_b, True), len(blocks)
    lang = guess_language(scores)
    if lang == "prose":
        return None, 0
    ranked = sorted(scores.values(), reverse=True)
    if lang in PARSED_LANGUAGES and ranked[0] < RAW_PARSE_RATIO * ranked[1]:
        lang = "mixed"  # unfenced and ambiguous: not worth a parse that fails slowly
    return Block(lang, data, False), 0


_local = threading.local()


def _parser(language: str):
    """One tree-sitter parser per (thread, language); parsers are not thread-safe."""
    parsers = _local.__dict__.setdefault("parsers", {})
    if language not in parsers:
        import tree_sitter as ts

        grammar = grammars.language(language)
        if grammar is None:
            raise ValueError(f"no tree-sitter grammar for {language!r}")
        parsers[language] = ts.Parser(grammar)
    return parsers[language]


def _window(data: bytes) -> bytes:
    """The last :data:`TS_MAX_BYTES` of ``data``, starting at an unindented line when one
    exists (a cut mid-block would otherwise parse as an error)."""
    if len(data) <= TS_MAX_BYTES:
        return data
    tail = data[-TS_MAX_BYTES:]
    cut = tail.find(b"\n")
    for m in re.finditer(rb"\n(?=[^ \t\n])", tail):
        cut = m.start()
        break
    return tail[cut + 1:] if cut >= 0 else tail


@dataclass
class ParseStats:
    """tree-sitter facts about one block window. Counts are per parsed window."""

    parsed: float = 0.0  # 1 when a grammar parsed the window
    nodes_per_byte: float = 0.0  # syntax nodes per byte: structure density
    error_nodes: float = 0.0  # ERROR nodes (malformed or cut-off code)
    missing_nodes: float = 0.0  # MISSING nodes the parser inserted (e.g. a closing bracket)
    end_depth: float = 0.0  # syntax-tree depth at the last byte: how much is still open


def parse_stats(block: Block | None) -> ParseStats:
    """Parse the tail window of ``block`` when its language has a grammar; never raises."""
    if block is None or block.language not in PARSED_LANGUAGES or not block.data.strip():
        return ParseStats()
    data = _window(block.data)
    try:
        tree = _parser(block.language).parse(data)
    except Exception:  # noqa: BLE001 - a parser failure is a feature value, not an error
        return ParseStats()
    root = tree.root_node
    errors = missing = 0
    if root.has_error:  # descend only along subtrees that contain errors: cheap
        stack = [root]
        while stack and errors + missing < 256:
            node = stack.pop()
            if node.is_error:
                errors += 1
            elif node.is_missing:
                missing += 1
            stack.extend(c for c in node.children if c.has_error or c.is_missing)
    depth = 0
    end = len(data.rstrip())
    node = root.descendant_for_byte_range(max(end - 1, 0), end) if end else None
    while node is not None and depth < 512:
        depth += 1
        node = node.parent
    return ParseStats(1.0, root.descendant_count / max(len(data), 1), float(errors),
                      float(missing), float(depth))
