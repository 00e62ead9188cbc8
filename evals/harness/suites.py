"""Eval suites as data: one request per JSONL line, plus the suite's content hash.

The JSONL format (one object per line; unknown keys are rejected)::

    {"id": "tex-0003-close",              # unique within the suite (required)
     "prompt": "...",                      # a plain-text prompt, or
     "messages": [{"role": "user", "content": "..."}],   # a conversation (exactly one of the two)
     "reference": "...",                   # the reference answer (optional; needed for loss)
     "metric": "exact_match",              # optional: exact_match | contains | numeric | code_test
     "test": "def check(f): ...",          # optional: test code for metric=code_test
     "entry_point": "f",                   # optional: the function code_test calls check() on
     "domain": "tex",                      # free tag (default "general")
     "kind": "close_markup"}               # free tag (default "general")

Quality needs a ``reference`` (its teacher-forced loss under each backend); a request
without one is only routed and costed (and scored by its task metric when generating).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from models.base import ChatMessage

Metric = Literal["exact_match", "contains", "numeric", "code_test"]
METRICS: tuple[str, ...] = ("exact_match", "contains", "numeric", "code_test")
_KEYS = {"id", "prompt", "messages", "reference", "metric", "test", "entry_point", "domain", "kind"}


class SuiteError(ValueError):
    """A suite file or table that does not follow the documented format."""


@dataclass(frozen=True)
class EvalRequest:
    """One request of a suite. Exactly one of ``prompt`` / ``messages`` is set."""

    id: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    reference: str | None = None
    metric: Metric | None = None
    test: str | None = None
    entry_point: str | None = None
    domain: str = "general"
    kind: str = "general"

    def __post_init__(self) -> None:
        if not self.id:
            raise SuiteError("request id must be a non-empty string")
        if (self.prompt is None) == (self.messages is None):
            raise SuiteError(f"{self.id}: give exactly one of 'prompt' and 'messages'")
        if self.metric is not None and self.metric not in METRICS:
            raise SuiteError(f"{self.id}: unknown metric {self.metric!r} (known: {', '.join(METRICS)})")
        if self.metric == "code_test" and not self.test:
            raise SuiteError(f"{self.id}: metric code_test needs 'test'")
        if self.metric in ("exact_match", "contains", "numeric") and self.reference is None:
            raise SuiteError(f"{self.id}: metric {self.metric} needs 'reference'")

    @property
    def text(self) -> str:
        """The prompt as plain text (turns joined by blank lines; the reference models are
        not chat-tuned, so no chat template is applied)."""
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        return "\n\n".join(m.content for m in self.messages)

    def routing_request(self):  # -> classifiers.request.RoutingRequest
        from classifiers.request import RoutingRequest

        if self.prompt is not None:
            return RoutingRequest.from_prompt(self.prompt)
        return RoutingRequest.from_messages(list(self.messages or ()))

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if self.messages is not None:
            d["messages"] = [{"role": m.role, "content": m.content} for m in self.messages]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvalRequest:
        unknown = set(d) - _KEYS
        if unknown:
            raise SuiteError(f"{d.get('id', '?')}: unknown keys {sorted(unknown)}")
        msgs = d.get("messages")
        if msgs is not None:
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
                raise SuiteError(f"{d.get('id', '?')}: 'messages' must be a list of {{role, content}}")
            msgs = tuple(ChatMessage(m.get("role", "user"), str(m["content"])) for m in msgs)
        return cls(id=str(d.get("id", "")), prompt=d.get("prompt"), messages=msgs,
                   reference=d.get("reference"), metric=d.get("metric"), test=d.get("test"),
                   entry_point=d.get("entry_point"), domain=str(d.get("domain", "general")),
                   kind=str(d.get("kind", "general")))


@dataclass(frozen=True)
class Suite:
    """A named, ordered collection of requests with unique ids."""

    name: str
    requests: tuple[EvalRequest, ...]
    source: str = ""  # where it came from (a path, "builtin:humaneval", ...)
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for r in self.requests:
            if r.id in seen:
                raise SuiteError(f"suite {self.name}: duplicate id {r.id!r}")
            seen.add(r.id)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def content_hash(self) -> str:
        """sha256 (hex, 16 chars) of the canonical JSON of every request, in order."""
        h = hashlib.sha256()
        for r in self.requests:
            h.update(json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()[:16]

    def domains(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.requests:
            out[r.domain] = out.get(r.domain, 0) + 1
        return out

    def head(self, n: int | None) -> Suite:
        """The first ``n`` requests (all when ``n`` is None)."""
        if n is None or n >= len(self.requests):
            return self
        return Suite(self.name, self.requests[:n], self.source, dict(self.meta))


def load_jsonl(path: str | Path, name: str | None = None) -> Suite:
    """Read a suite in the documented JSONL format (blank lines and ``#`` lines skipped)."""
    path = Path(path)
    reqs: list[EvalRequest] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise SuiteError(f"{path}:{lineno}: not JSON ({e.msg})") from e
            if not isinstance(d, dict):
                raise SuiteError(f"{path}:{lineno}: each line must be a JSON object")
            try:
                reqs.append(EvalRequest.from_dict(d))
            except SuiteError as e:
                raise SuiteError(f"{path}:{lineno}: {e}") from e
    return Suite(name or path.stem, tuple(reqs), str(path))


def write_jsonl(suite: Suite | Sequence[EvalRequest], path: str | Path) -> None:
    reqs: Iterable[EvalRequest] = suite.requests if isinstance(suite, Suite) else suite
    with Path(path).open("w", encoding="utf-8") as f:
        for r in reqs:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
