"""The one ``archroute`` command. Subcommands live in their own modules and are imported
only when run, so ``archroute --help`` stays fast (no torch import)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

# name -> "module:attr"; attr is a function(subparsers) -> None that adds the subcommand
# parser and sets ``func`` (a callable taking the parsed args, returning an exit code).
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("router.commands:add_serve", "run the routing server (OpenAI-compatible)"),
    "serve-model": ("router.commands:add_serve_model", "serve one backend as an OpenAI-compatible server"),
    "generate": ("models.commands:add_generate", "generate text with one backend"),
    "score": ("models.commands:add_score", "per-token log-probabilities of a continuation"),
    "info": ("models.commands:add_info", "describe the embedded reference pair and cost models"),
    "analyze": ("evals.analysis.cli:add_analyze", "token-level loss gap analysis of a backend pair"),
    "label": ("classifiers.training.cli:add_label", "measure request labels on a backend pair"),
    "train": ("router.learning.retrain:add_train", "train the request classifier"),
    "learning": ("router.learning.history:add_learning", "the learning loop's history"),
    "eval": ("evals.harness.cli:add_eval", "benchmark routing policies: quality vs cost"),
    "bench": ("evals.bench.cli:add_bench", "speed benchmarks that print their figures"),
    "span-eval": ("evals.span.cli:add_span_eval", "teacher-forced span routing evaluation"),
}


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: the first argument that is not a global option."""
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


class Parser(argparse.ArgumentParser):
    """argparse with abbreviations off, here and in every subcommand's parser (subparsers
    are made with the parent's class): ``--suite`` must not silently mean ``--suites``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` (default ``sys.argv[1:]``) is
    imported and built in full, the others are listed by name."""
    wanted = _command_in(sys.argv[1:] if argv is None else argv)
    parser = Parser(
        prog="archroute",
        description="ArchRoute: route each request to the transformer or the hybrid backend.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (target, help_text) in COMMANDS.items():
        if name == wanted:
            module, attr = target.split(":")
            getattr(importlib.import_module(module), attr)(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # httpx logs every upstream request at INFO: a line (and CPU) per call
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 0
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"{args.command}: not available in this build")
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("archroute: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line; the traceback with -v
        if args.verbose:
            raise
        print(f"archroute {args.command}: error: {one_line(exc)} (run with -v for the "
              "traceback)", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """An exception as one readable line: its type when the message does not say much."""
    msg = " ".join(str(exc).split())
    if len(msg) > 500:
        msg = msg[:500] + " ..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
