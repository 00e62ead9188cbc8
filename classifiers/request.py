"""What a routing policy sees of a request: its text, and for a policy that asks for it
(``needs_probe``, the ``probe`` policy) the prompt probe the router measured on it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from models.base import ChatMessage

# P(transformer better) >= this routes to the transformer, unless a profile or an artifact
# says otherwise: the one default for the router, the policies and the metrics
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class RoutingRequest:
    """A request as policies and classifiers see it.

    ``messages`` holds the conversation (a completion prompt is one user message);
    ``max_tokens`` is the caller's output budget when it gave one. ``probe``: the prompt
    probe's features by name (:data:`classifiers.probe.PROBE_FEATURES`, nats/token, NaN
    where a category is absent), measured by the router from both backends' prefill of the
    prompt for a policy that needs it; None when not measured (or the measurement failed).
    """

    messages: tuple[ChatMessage, ...]
    max_tokens: int | None = None
    kind: str = "chat"  # "chat" | "completion"
    probe: Mapping[str, float] | None = field(default=None, hash=False, compare=False)

    @classmethod
    def from_prompt(cls, prompt: str, max_tokens: int | None = None) -> RoutingRequest:
        return cls((ChatMessage("user", prompt),), max_tokens, "completion")

    @classmethod
    def from_messages(cls, messages: list[dict[str, str]] | list[ChatMessage],
                      max_tokens: int | None = None) -> RoutingRequest:
        msgs = tuple(m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"])  # type: ignore[arg-type]
                     for m in messages)
        return cls(msgs, max_tokens, "chat")

    @property
    def text(self) -> str:
        """All turns' text joined by blank lines."""
        return "\n\n".join(m.content for m in self.messages)

    @property
    def last_user(self) -> str:
        """The last user turn's text ('' when there is none)."""
        for m in reversed(self.messages):
            if m.role == "user":
                return m.content
        return ""
