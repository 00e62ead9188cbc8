"""What the docs test reads from the Markdown pages: fenced blocks, their markers, commands,
links and anchors. Parsing is markdown-it-py's (CommonMark), not ours.

A fenced shell or Python block (or an unlabelled one that holds a command) must be preceded
by a marker comment saying what the docs test does with it:

``<!-- docs-test: run -->``
    run as written, from the repository root, with the project's environment first on PATH
``<!-- docs-test: server -->``
    run as written against a real router on the embedded pair (``archroute serve``, started
    by the test on a free port: ``127.0.0.1:8000`` in the block is that port)
``<!-- docs-test: skip: REASON -->``
    not run (long, GPU, maintainer-only, needs the shared data ...); the reason is required

Whether run or not, every command in every block and in inline code (``archroute SUB
--flag``, ``python -m MODULE``, ``./dev CMD``) is checked against the code: the subcommand,
each flag, the module and the ``./dev`` command must exist.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[2]

# the pages a user follows (generated reports under docs/*/ are outputs, not instructions)
PAGES = sorted(
    [ROOT / "README.md", *ROOT.glob("docs/*.md"), ROOT / "models/reference/README.md"],
    key=str)

SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py"}
MARKER = re.compile(r"<!--\s*docs-test:\s*(run|server|skip)\s*(?::\s*(.*?))?\s*-->", re.S)
COMMAND_START = re.compile(r"^\s*(?:[A-Z_]+=\S+\s+)*(?:time\s+|nice\s+)*"
                           r"(archroute|\./dev|python|\.venv/bin/python|curl)\b")


@dataclass
class Block:
    page: Path
    line: int          # 1-based line of the opening fence
    lang: str          # the fence's info word ('' when unlabelled)
    code: str
    marker: str | None  # run | server | skip | None
    reason: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str | None:
        """'shell' or 'python' when the block is something a reader runs, else None."""
        if self.lang in SHELL:
            return "shell"
        if self.lang in PYTHON:
            return "python"
        if not self.lang and any(COMMAND_START.match(x) for x in self.code.splitlines()):
            return "shell"
        return None


_md = MarkdownIt()


def tokens(page: Path):
    return _md.parse(page.read_text(encoding="utf-8"))


def blocks(page: Path) -> list[Block]:
    toks = tokens(page)
    out = []
    for i, t in enumerate(toks):
        if t.type != "fence":
            continue
        marker, reason = None, ""
        # the marker is the HTML block right before the fence
        if i > 0 and toks[i - 1].type == "html_block":
            m = MARKER.search(toks[i - 1].content)
            if m:
                marker, reason = m.group(1), (m.group(2) or "").strip()
        lang = (t.info or "").split()[0] if t.info else ""
        out.append(Block(page, t.map[0] + 1, lang, t.content, marker, reason))
    return out


def inline_code(page: Path) -> list[str]:
    """Every inline code span of the page (where commands in prose and tables live)."""
    out = []
    for t in tokens(page):
        for c in t.children or []:
            if c.type == "code_inline":
                out.append(c.content)
    return out


def links(page: Path) -> list[str]:
    out = []
    for t in tokens(page):
        for c in t.children or []:
            if c.type == "link_open":
                out.append(str(c.attrs.get("href", "")))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    toks = tokens(page)
    seen: dict[str, int] = {}
    out = set()
    for i, t in enumerate(toks):
        if t.type == "heading_open":
            text = "".join(c.content for c in toks[i + 1].children or []
                           if c.type in ("text", "code_inline"))
            base = slug(text)
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def command_lines(code: str) -> list[str]:
    """Logical lines of a shell snippet: continuations joined, comments and heredoc bodies
    dropped, ``a && b`` / ``a; b`` / ``a | b`` split."""
    lines, buf, heredoc = [], "", None
    for raw in code.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        line = raw.rstrip()
        m = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
        if m:
            heredoc = m.group(1)
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            lines.append(buf)
        buf = ""
    if buf.strip():
        lines.append(buf)
    out = []
    for line in lines:
        line = re.sub(r"(^|\s)#.*$", "", line)  # comments
        for part in re.split(r"&&|\|\||;|\|(?!\|)|&(?=\s|$)", line):
            if part.strip():
                out.append(part.strip())
    return out


def split_words(line: str) -> list[str]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] in ("time", "nice")):
        words = words[1:]
    return words
