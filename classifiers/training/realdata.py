"""Real requests with reference answers: the request-file format, its validation and sources.

One JSON object per line (the format of ``../shared/data/requests/*.jsonl``)::

    {"id": "dolly-0001",                      # unique in the file (required)
     "source": "databricks-dolly-15k",        # where it comes from (required)
     "kind": "closed_qa",                     # what it asks for (required)
     "messages": [{"role": "user", "content": "..."}, ...],  # the conversation up to the
                                                # turn to answer; the last one is the user's
     "reference": "..."}                      # the reference answer to that turn (non-empty)

Every key is required and no other key is accepted. A file with a bad line is refused as a
whole, before anything is labelled or written: :class:`RequestFileError` lists each bad line
with its number (``path:line: reason``), so nothing is ever half-labelled from a broken file.

Held-out *sources* are the unit of generalisation (see :mod:`classifiers.training.train_router`): a file
is one source group; :data:`EVAL_ONLY` files are read for evaluation and never trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from classifiers.request import RoutingRequest
from models.base import ChatMessage

KEYS = ("id", "source", "kind", "messages", "reference")
ROLES = ("system", "user", "assistant")
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "requests"
# the authors of this set ask that it is not trained on (its README): evaluation only
EVAL_ONLY = frozenset({"selfinstruct_user_eval"})
# reserved for the independent held-out check: refused if anyone points `label`/`train` at them
RESERVED = ("arena", "gsm8k", "humaneval")
MAX_ERRORS = 20  # errors listed before the rest are only counted


class RequestFileError(ValueError):
    """A request file that does not follow the format; the message names every bad line."""


@dataclass(frozen=True)
class RealRequest:
    """One real request with its reference answer. ``group`` is the file stem (the unit held
    out together); ``source`` and ``kind`` are as the file gives them."""

    id: str
    group: str
    source: str
    kind: str
    messages: tuple[ChatMessage, ...]
    reference: str

    def routing(self) -> RoutingRequest:
        return RoutingRequest(self.messages, None, "chat")

    def to_json(self) -> dict:
        return {"id": self.id, "group": self.group, "source": self.source, "kind": self.kind,
                "messages": [{"role": m.role, "content": m.content} for m in self.messages],
                "reference": self.reference}

    @property
    def split(self) -> str:
        """A stable 80/20 random split by id (the secondary, in-distribution number)."""
        h = int.from_bytes(hashlib.sha256(self.id.encode()).digest()[:8], "big")
        return "test" if h % 5 == 0 else "train"


def _check_line(obj, where: str) -> str | None:
    """The reason a parsed line is invalid, or None."""
    if not isinstance(obj, dict):
        return f"{where}: expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in KEYS if k not in obj]
    if missing:
        return f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        return f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} " \
               f"(expected exactly {', '.join(KEYS)})"
    for k in ("id", "source", "kind"):
        if not isinstance(obj[k], str) or not obj[k].strip():
            return f"{where}: '{k}' must be a non-empty string"
    if not isinstance(obj["reference"], str) or not obj["reference"].strip():
        return f"{where}: 'reference' must be a non-empty string"
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        return f"{where}: 'messages' must be a non-empty list"
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            return f"{where}: messages[{j}] must be an object with exactly 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"{where}: messages[{j}].role {m['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"{where}: messages[{j}].content must be a string"
    if msgs[-1]["role"] != "user":
        return f"{where}: the last message must be the user's (the turn to answer)"
    if not msgs[-1]["content"].strip():
        return f"{where}: the last user message is empty"
    return None


def read_request_file(path: str | Path) -> list[RealRequest]:
    """Every request of one file, validated as a whole (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise RequestFileError(f"{path}: no such request file")
    if any(r in path.stem.lower() for r in RESERVED):
        raise RequestFileError(f"{path}: {path.stem} is reserved for the independent held-out "
                               "check and is never labelled or trained on here")
    errors: list[str] = []
    out: list[RealRequest] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise RequestFileError(f"{path}: not UTF-8 ({exc})") from None
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        reason = _check_line(obj, where)
        if reason is None and obj["id"] in seen:
            reason = f"{where}: duplicate id {obj['id']!r} (first on line {seen[obj['id']]})"
        if reason:
            errors.append(reason)
            continue
        seen[obj["id"]] = n
        out.append(RealRequest(obj["id"], path.stem, obj["source"], obj["kind"],
                               tuple(ChatMessage(m["role"], m["content"]) for m in obj["messages"]),
                               obj["reference"]))
    if errors:
        more = f"\n... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise RequestFileError(f"{path}: {len(errors)} bad line{'s' * (len(errors) > 1)}, "
                               "nothing was read:\n" + "\n".join(errors[:MAX_ERRORS]) + more)
    if not out:
        raise RequestFileError(f"{path}: no requests")
    return out


def request_files(paths: Iterable[str | Path]) -> list[Path]:
    """The JSONL files named by ``paths`` (files, or directories of ``*.jsonl``), sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.jsonl")))
        elif p.is_file():
            files.append(p)
        else:
            raise RequestFileError(f"{p}: no such file or directory")
    if not files:
        raise RequestFileError(f"no *.jsonl request files in {', '.join(map(str, paths))}")
    return files


def read_requests(paths: Iterable[str | Path], per_group: int | None = None, seed: int = 0,
                  include_eval_only: bool = True,
                  exclude: Collection[str] = ()) -> list[RealRequest]:
    """Requests of every file (each validated first, so a bad file stops everything before
    any work). ``exclude``: ids left out (the requests a tuned pair was trained on,
    :func:`models.reference_pair.tuned_request_ids`), before ``per_group`` keeps at most that
    many per file, a fixed-seed sample."""
    import random

    out: list[RealRequest] = []
    for f in request_files(paths):
        if f.stem in EVAL_ONLY and not include_eval_only:
            continue
        reqs = read_request_file(f)
        if exclude:
            reqs = [r for r in reqs if r.id not in exclude]
        if per_group is not None and len(reqs) > per_group:
            rng = random.Random(f"{seed}:{f.stem}")
            keep = set(rng.sample(range(len(reqs)), per_group))
            reqs = [r for i, r in enumerate(reqs) if i in keep]
        out.extend(reqs)
    return out


def file_provenance(paths: Sequence[str | Path]) -> list[dict]:
    """sha256, size and row count of each request file, for artifact metadata and docs."""
    rows = []
    for f in request_files(paths):
        data = f.read_bytes()
        rows.append({"file": f.name, "sha256": hashlib.sha256(data).hexdigest(),
                     "bytes": len(data), "rows": data.count(b"\n"),
                     "license": LICENSES.get(f.stem, "see the data folder's README"),
                     "eval_only": f.stem in EVAL_ONLY})
    return rows


# Licences of the shared request files (from ../shared/data/requests/README.md).
LICENSES: dict[str, str] = {
    "dolly": "CC-BY-SA-3.0",
    "hh_rlhf_helpful": "MIT",
    "mbpp": "CC-BY-4.0",
    "codexglue_java_cs": "C-UDA-1.0",
    "codexglue_refinement": "C-UDA-1.0",
    "quixbugs": "MIT",
    "wikisplit": "CC-BY-SA-4.0",
    "xquad_en": "CC-BY-SA-4.0",
    "mtbench": "Apache-2.0",
    "aqua_rat": "Apache-2.0",
    "selfinstruct_user_eval": "Apache-2.0",
}
