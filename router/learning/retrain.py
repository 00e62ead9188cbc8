"""Retraining from the router's own traffic: ``archroute train --from-log DB --out DIR``.

The decision log's requests with a scored reference (``POST /v1/feedback`` with a
``reference``, on a router with ``log_prompts``) become label rows of the shape ``archroute
label`` writes, and the shipped model variant is refitted on them (and on a label file, if
given) by :func:`classifiers.training.train_router.fit_quick`. The ``train`` command is
:mod:`classifiers.training.cli`'s; this module adds its ``--from-log`` path, which reads the router's
log and so lives in the router layer (models < classifiers < router < evals).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from router.decision_log import read_log, redact_url
from router.learning.logrows import routing_request


def add_train(sub: argparse._SubParsersAction) -> None:
    """``archroute train``: :func:`classifiers.training.cli.add_train`'s parser, run here so that
    ``--from-log`` can read the decision log."""
    from classifiers.training import cli

    cli.add_train(sub)
    p = sub.choices["train"]
    p.add_argument("--refit", choices=("scratch", "warm"), default="scratch",
                   help="with --from-log: fit the shipped variant from nothing (default), or "
                        "warm-start from the shipped artifact (--base) and write its guard "
                        "(guard.json, for profiles with policy: guarded)")
    p.add_argument("--base", metavar="DIR", help="with --refit warm: the artifact to start "
                   "from (default: the shipped classifiers/default/)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from classifiers.training import cli

    if getattr(args, "from_log", None):
        return run_train_from_log(args)
    return cli.run_train(args)


def log_label_rows(db: str) -> tuple[list[dict], list, dict]:
    """Label rows (the shape ``archroute label`` writes) for the decision log's requests
    with a scored reference, the requests as the policy saw them, and counts of what was
    left out. Chat apps' side requests are left out (the classifier never scores them)."""
    from classifiers.training.labels import label_class
    from router.learning.gate import held_back

    rows, reqs = [], []
    left = {"side request": 0, "no prompt": 0, "held back for the reload gate": 0}
    for r in read_log(db):
        gap = r.get("gap")
        if r.get("label_status") != "done" or gap is None or gap != gap:
            continue
        if r.get("side"):
            left["side request"] += 1
            continue
        q = routing_request(r)
        if q is None:
            left["no prompt"] += 1
            continue
        rid = r["request_id"]
        if held_back(str(rid)):  # the gate's evidence: never trained on
            left["held back for the reload gate"] += 1
            continue
        part = int(hashlib.sha256(rid.encode()).hexdigest(), 16) % 4  # 4 inner group folds
        rows.append({"id": rid, "key": f"{rid}:log", "group": "decision-log",
                     "kind": f"part{part}", "gap": float(gap),
                     "loss_transformer": float(r["loss_transformer"]),
                     "loss_hybrid": float(r["loss_hybrid"]), "label": label_class(float(gap)),
                     "pair": None})
        reqs.append(q)
    return rows, reqs, left


def run_train_from_log(args: argparse.Namespace) -> int:
    """``archroute train --from-log DB --out DIR [--labels FILE]``: the quick fit on the
    log's labelled requests (and the label file's, if given)."""
    from classifiers.training.cli import quick_summary
    from classifiers.training.labels import require_labels
    from classifiers.training.train_router import fit_quick
    from classifiers.training.train_router import routing_request as label_request

    if not args.out:
        raise SystemExit("archroute train --from-log: give --out DIR (the shipped artifact "
                         "is not overwritten from a log)")
    try:
        rows, reqs, left = log_label_rows(args.from_log)
    except Exception as exc:  # noqa: BLE001 - a missing file, a database that refuses
        raise SystemExit(f"archroute train --from-log: cannot read "
                         f"{redact_url(str(args.from_log))}: {exc}") from None
    n_log = len(rows)
    if args.labels:
        extra = [r for r in require_labels(args.labels, latest_only=True)
                 if r["gap"] == r["gap"]]
        if not extra or "group" not in extra[0]:
            raise SystemExit(f"--labels {args.labels}: no labels of real requests (with a "
                             "`group`) to add")
        rows += extra
        reqs += [label_request(r) for r in extra]
    skipped = ", ".join(f"{v} {k}" for k, v in left.items() if v)
    print(f"{n_log} labelled requests from the log{f' (left out: {skipped})' if skipped else ''}"
          f"{f', {len(rows) - n_log} from {args.labels}' if args.labels else ''}")
    if n_log == 0 and not args.labels:
        raise SystemExit("archroute train --from-log: the log holds no scored references "
                         "(POST /v1/feedback with a `reference`, on a router with "
                         "log_prompts: true); feedback rewards alone are not training labels: "
                         "evaluate with `archroute eval --from-log` instead")
    if getattr(args, "refit", "scratch") == "warm":
        return _train_warm(args, rows, reqs, n_log)
    try:
        res = fit_quick(rows, reqs, args.out, args.seed,
                        {"decision_log": redact_url(str(args.from_log)), "n_from_log": n_log,
                         "labels": Path(args.labels).name if args.labels else None})
    except ValueError as exc:
        raise SystemExit(f"archroute train --from-log: {exc}") from None
    print(quick_summary(res, args.out))
    return 0


def _train_warm(args: argparse.Namespace, rows: list[dict], reqs: list, n_log: int) -> int:
    """``--refit warm``: :func:`router.learning.candidate.fit_candidate` from the base."""
    import numpy as np

    from classifiers import artifact as A
    from router.learning.candidate import fit_candidate

    try:
        base = A.load(args.base, verify=True, strict=True) if args.base else A.load_default()
        res = fit_candidate(base, reqs, np.array([r["loss_transformer"] for r in rows]),
                            np.array([r["loss_hybrid"] for r in rows]),
                            [r["id"] for r in rows], args.out, args.seed or 0, "warm",
                            {"decision_log": redact_url(str(args.from_log)),
                             "n_from_log": n_log})
    except (ValueError, A.ArtifactError) as exc:
        raise SystemExit(f"archroute train --from-log --refit warm: {exc}") from None
    g = res["guard"]
    print(f"kept: {res['kept']} (held-out loss {res['held_out_loss']}); guard: best single "
          f"{g['best_single']}, {len(g['clusters'])} clusters; {res['fit_s']:.1f} s; "
          f"self-check passed; artifact {args.out}")
    return 0
