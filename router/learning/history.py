"""``archroute learning history [--log PATH|URL] [--json]``: the learning loop's steps as the
decision log recorded them (table ``learning_events``, written by
:mod:`router.learning.auto`): retrains started, candidates promoted or refused with the
gate's DR figures, failures, rollbacks and reloads, from every replica sharing the log."""

from __future__ import annotations

import argparse
import json
import time

from router.decision_log import read_learning_events, redact_url

DEFAULT_LOG = "archroute-decisions.sqlite"  # the router's default decision_log
COLUMNS = ("id", "time", "profile", "event", "replica", "labels", "live", "candidate",
           "gate", "held", "s", "reason")


def add_learning(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learning", help="the learning loop's history",
                       description="The learning loop that a profile's `learning:` setting "
                                   "runs in the router (docs/learning-loop.md).")
    inner = p.add_subparsers(dest="learning_command", metavar="SUBCOMMAND", required=True)
    h = inner.add_parser("history", help="every step the loop recorded in the decision log")
    h.add_argument("--log", default=DEFAULT_LOG, metavar="PATH|URL",
                   help=f"the decision log: a SQLite file or a postgresql:// URL (default "
                        f"{DEFAULT_LOG})")
    h.add_argument("--profile", help="only this profile's steps")
    h.add_argument("--last", type=int, metavar="N", help="only the last N steps")
    h.add_argument("--json", action="store_true", help="one JSON array of the rows")
    h.set_defaults(func=run_history)


def _fmt(x: object, spec: str = "") -> str:
    if x is None:
        return "-"
    return format(x, spec) if spec else str(x)


def table(rows: list[dict]) -> str:
    """The steps as an aligned text table (the gate: DR difference, candidate - serving,
    nats/token, and its 95% CI)."""
    out = [list(COLUMNS)]
    for r in rows:
        gate = "-"
        if r.get("difference") is not None:
            gate = (f"{r['difference']:+.4f} [{_fmt(r.get('ci_low'), '+.4f')}, "
                    f"{_fmt(r.get('ci_high'), '+.4f')}]")
        reason = " ".join(str(r.get("reason") or "").split())
        out.append([str(r["id"]), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"])),
                    r["profile"], r["event"], _fmt(r.get("replica")), _fmt(r.get("labels")),
                    _fmt(r.get("live")), _fmt(r.get("candidate")), gate,
                    _fmt(r.get("held_back")), _fmt(r.get("seconds"), ".1f"),
                    reason[:100] + (" ..." if len(reason) > 100 else "")])
    widths = [max(len(row[i]) for row in out) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)),
                                row[-1]]).rstrip() for row in out)


def run_history(args: argparse.Namespace) -> int:
    if args.last is not None and args.last < 1:
        raise SystemExit("archroute learning history: --last must be at least 1")
    try:
        rows = read_learning_events(args.log)
    except Exception as exc:  # noqa: BLE001 - a missing file, a database that refuses
        raise SystemExit(f"archroute learning history: cannot read "
                         f"{redact_url(str(args.log))}: {exc}") from None
    if args.profile:
        rows = [r for r in rows if r["profile"] == args.profile]
    if args.last:
        rows = rows[-args.last:]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no learning steps in {redact_url(str(args.log))} (a profile with "
              "`learning:` records them once it retrains)")
        return 0
    print(table(rows))
    return 0
