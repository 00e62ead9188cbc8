"""The docs work as written (issue #27): every shell and Python block in README.md, docs/*.md
and the model card is either run here or marked as not run with a reason; every command,
flag, module, ``./dev`` command, linked file and anchor they name exists.

Markers and what they mean: tests/docs/docblocks.py. Blocks marked ``server`` run against a
real ``archroute serve`` process on the embedded pair (uvicorn, a free port)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.docs.docblocks import (
    PAGES,
    ROOT,
    Block,
    anchors,
    blocks,
    command_lines,
    inline_code,
    links,
    split_words,
)

ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
RUNNABLE = [b for b in ALL_BLOCKS if b.kind]


def _id(b: Block) -> str:
    return b.where


# --- every block is run or says why not ------------------------------------------------
def test_pages_found():
    assert ROOT / "README.md" in PAGES and len(PAGES) >= 5
    assert len(RUNNABLE) >= 10, "the parser found too few blocks: is markdown-it-py working?"


@pytest.mark.parametrize("block", RUNNABLE, ids=_id)
def test_block_is_marked(block: Block):
    assert block.marker, (
        f"{block.where}: a {block.kind} block without a docs-test marker; put "
        "<!-- docs-test: run -->, <!-- docs-test: server --> or "
        "<!-- docs-test: skip: REASON --> on the line before it (tests/docs/docblocks.py)")
    if block.marker == "skip":
        assert len(block.reason) >= 8, f"{block.where}: a skip marker needs its reason"
    if not block.lang:
        pytest.fail(f"{block.where}: a block of commands needs a language (```bash)")


# --- commands, flags, modules ----------------------------------------------------------
def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _flags(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def check_archroute(words: list[str]) -> list[str]:
    """Problems with ``archroute WORDS...``: unknown subcommand or flag."""
    from router.cli import COMMANDS, build_parser

    problems = []
    rest = [w for w in words if w not in ("-v", "--verbose")]
    if not rest or rest[0] in ("--help", "-h"):
        return problems
    sub = rest[0]
    if sub not in COMMANDS:
        return [f"unknown subcommand {sub!r}"]
    parser = _subparsers(build_parser([sub]))[sub]
    flags = _flags(parser) | {"-v", "--verbose"}
    for w in rest[1:]:
        nested = _subparsers(parser)
        if w in nested:  # archroute bench span --flags
            parser = nested[w]
            flags |= _flags(parser)
            continue
        if w.startswith("--") and w not in ("--", "---"):
            name = w.split("=", 1)[0]
            if name not in flags:
                problems.append(f"archroute {sub}: no flag {name}")
    return problems


def _dev_commands() -> set[str]:
    text = (ROOT / "dev").read_text()
    body = text.split('case "$cmd" in', 1)[1]
    return set(re.findall(r"^\s+([a-z|-]+)\)", body, re.M)) - {"*"}


def check_command(line: str) -> list[str]:
    words = split_words(line)
    if not words:
        return []
    head = words[0]
    if head == "archroute":
        return check_archroute(words[1:])
    if head in ("python", "python3", ".venv/bin/python") and words[1:2] == ["-m"]:
        if len(words) < 3:
            return []
        module = words[2]
        if importlib.util.find_spec(module) is None:
            return [f"no module {module}"]
        if module == "router.cli":
            return check_archroute(words[3:])
        return []
    if head == "./dev" and len(words) > 1:
        known = {c for group in _dev_commands() for c in group.split("|")}
        return [] if words[1] in known else [f"./dev has no command {words[1]!r}"]
    return []


def _commands_on(page: Path) -> list[tuple[str, str]]:
    out = []
    for b in blocks(page):
        if b.kind == "shell":
            out += [(b.where, line) for line in command_lines(b.code)]
    for code in inline_code(page):
        if re.match(r"^(archroute |python -m |\./dev )", code) and "..." not in code:
            out.append((str(page.relative_to(ROOT)), code))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_exist(page: Path):
    problems = [f"{where}: `{line}`: {p}" for where, line in _commands_on(page)
                for p in check_command(line)]
    assert not problems, "\n".join(problems)


# --- links and anchors -----------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path):
    problems = []
    for href in links(page):
        if re.match(r"^[a-z]+://|^mailto:", href):
            continue
        path, _, anchor = href.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            problems.append(f"{href}: no file {target.relative_to(ROOT)}")
            continue
        if anchor and target.suffix == ".md" and anchor not in anchors(target):
            problems.append(f"{href}: no heading with anchor #{anchor} in "
                            f"{target.relative_to(ROOT)}")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


# --- settings named in config snippets ---------------------------------------------------
@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang in ("yaml", "yml")], ids=_id)
def test_yaml_settings_exist(block: Block):
    """A router config snippet names only settings that exist (the settings model forbids
    unknown keys)."""
    from router.settings import Settings

    data = yaml.safe_load(block.code)
    if not isinstance(data, dict):
        return
    unknown = set(data) - set(Settings.model_fields)
    assert not unknown, f"{block.where}: no such settings: {sorted(unknown)}"


# --- run what is marked to run -------------------------------------------------------------
def _env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def run_block(block: Block, port: int | None = None, timeout: float = 300) -> None:
    code = block.code
    if port is not None:
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    if block.kind == "shell":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        cmd = [sys.executable, "-c", code]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (f"{block.where} failed as written (exit {r.returncode}):\n"
                               f"{code}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n"
                               f"{r.stderr[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in RUNNABLE if b.marker == "run"], ids=_id)
def test_run_block(block: Block):
    run_block(block)


@pytest.fixture(scope="module")
def docs_router():
    from tests.router.servers import Server, reference_available

    if not reference_available():
        pytest.skip("the embedded pair is not in models/reference")
    server = Server(["serve", "--decision-log", ""]).wait_ready(180)
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in RUNNABLE if b.marker == "server"], ids=_id)
def test_server_block(block: Block, docs_router):
    run_block(block, port=docs_router.port)
