"""Conversations stay on their backend (issue #24 item 5).

Chat apps (Open WebUI, LibreChat, the openai SDK in a loop) resend the whole history at
every turn. A backend that served the earlier turns holds that history in its prefix cache
(vLLM's prefix caching, ``serve-model``'s ``prefix_cache``); the other backend would read it
all again. So a follow-up turn stays on the backend that served the turn before, unless the
policy's predicted gain for switching beats the cost of that re-read:

- **a follow-up turn** is a chat request whose messages before its last user turn end with
  an assistant turn this router produced. :func:`turn_key` hashes a conversation (BLAKE2b,
  16 bytes, over each turn's role, stripped text and tool fields); when the router
  answers, it remembers ``turn_key(messages + [its answer])`` (:func:`answer_key`) with the
  backend that served it and the tokens that backend read and wrote; the next turn's
  :func:`follow_up_key` (the messages before its last user turn) finds it.
- **where it is remembered**: :class:`ConversationMemory`, an LRU of ``conversation_cache``
  entries in this process, and, with the decision log on, the row's ``turn_key`` column:
  a replica (or a restarted router) that has not seen the conversation finds the turn in the
  shared log (:meth:`Conversations.earlier`, one indexed query in a worker thread).
- **the decision** (:func:`stick`): with the earlier backend E and the policy's pick P != E,
  the gain is :meth:`router.policies.Policy.gain` (nats/token of the answer, measured from
  the decision boundary) and the handoff cost ``handoff_cost * tokens / 1000`` (the profile's
  ``conversation.handoff_cost``: nats/token per 1,000 tokens the other backend must read
  again, measured by ``archroute bench handoff``); the router switches only when
  ``gain >= cost`` (so a cost of 0 follows the policy). Exploration then applies to the
  result as to any decision (its propensity stays the logged action's probability).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

from models.base import ChatMessage, StreamChunk
from router.decision_log import DecisionLog, DecisionLogUnavailable

if TYPE_CHECKING:
    from classifiers.request import RoutingRequest
    from router.pool import BackendStream

log = logging.getLogger(__name__)

Outcome = Literal["same", "kept", "switched"]
INLINE_HASH_CHARS = 50_000  # longer conversations are hashed in a worker thread (~1 ms)


def turn_key(messages: Sequence[ChatMessage]) -> str:
    """The conversation ``messages`` as a key: 32 hex digits of BLAKE2b over each turn's
    role, stripped text and, when set, its tool calls, tool call id and name (JSON), each
    part length-prefixed (so no two conversations share an encoding)."""
    h = hashlib.blake2b(digest_size=16)
    for m in messages:
        extra = ((m.tool_calls, m.tool_call_id, m.name)
                 if m.tool_calls or m.tool_call_id or m.name else None)
        for part in (m.role, m.content.strip(),
                     "" if extra is None else json.dumps(extra, sort_keys=True)):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def follow_up_key(rreq: RoutingRequest) -> str | None:
    """The key of the conversation before ``rreq``'s last user turn, when those messages end
    with an assistant turn (a follow-up); None for a first turn or a completion."""
    if rreq.kind != "chat":
        return None
    msgs = rreq.messages
    last = max((i for i, m in enumerate(msgs) if m.role == "user"), default=-1)
    if last < 1 or msgs[last - 1].role != "assistant":
        return None
    return turn_key(msgs[:last])


def answer_key(rreq: RoutingRequest, answer: str) -> str:
    """The key the next turn will look for: ``rreq``'s messages and the router's answer."""
    return turn_key((*rreq.messages, ChatMessage("assistant", answer)))


@dataclass(frozen=True)
class Earlier:
    """The turn before: the role that served it and the tokens its backend has read
    (its prompt and its answer: what a switch makes the other backend read again)."""

    role: str
    tokens: int


class ConversationMemory:
    """An LRU of conversation keys -> :class:`Earlier`, at most ``entries`` (the least
    recently used dropped first). Used from the event loop only (no lock)."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._d: OrderedDict[str, Earlier] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: str) -> Earlier | None:
        e = self._d.get(key)
        if e is not None:
            self._d.move_to_end(key)
        return e

    def put(self, key: str, earlier: Earlier) -> None:
        self._d[key] = earlier
        self._d.move_to_end(key)
        while len(self._d) > self.entries:
            self._d.popitem(last=False)


@dataclass(frozen=True)
class Sticky:
    """A follow-up turn's decision: the earlier backend's role, the tokens it read, the
    policy's pick, its predicted gain for switching and the handoff cost (both nats/token
    of the answer), and the outcome (``same``: the policy picked the earlier backend;
    ``kept``: the cost held it there; ``switched``)."""

    earlier: str
    tokens: int
    picked: str
    gain: float | None
    handoff_cost: float
    outcome: Outcome

    @property
    def role(self) -> str:
        return self.picked if self.outcome == "switched" else self.earlier

    def record(self) -> dict:
        """The decision record's ``conversation`` object (and the response's)."""
        return {"earlier": self.earlier, "tokens": self.tokens, "picked": self.picked,
                "gain": None if self.gain is None else round(self.gain, 6),
                "handoff_cost": round(self.handoff_cost, 6), "outcome": self.outcome}

    def header(self) -> str:
        """``x-archroute-conversation``: ``kept; earlier=hybrid; gain=0.0123;
        handoff_cost=0.0456; tokens=812``."""
        gain = "" if self.gain is None else f"; gain={self.gain:.4f}"
        return (f"{self.outcome}; earlier={self.earlier}{gain}; "
                f"handoff_cost={self.handoff_cost:.4f}; tokens={self.tokens}")


def stick(earlier: Earlier, picked: str, gain: float, handoff_cost: float) -> Sticky:
    """The rule: stay on ``earlier.role`` unless the policy picked the other backend with a
    predicted gain (nats/token, >= 0 when it picked it) at least the handoff cost
    (``handoff_cost`` nats/token per 1,000 tokens re-read, times ``earlier.tokens``)."""
    cost = handoff_cost * earlier.tokens / 1000.0
    if picked == earlier.role:
        return Sticky(earlier.role, earlier.tokens, picked, None, cost, "same")
    return Sticky(earlier.role, earlier.tokens, picked, gain, cost,
                  "switched" if gain >= cost else "kept")


class Conversations:
    """The router's memory of the turns it answered: the LRU, then the decision log."""

    def __init__(self, entries: int, decision_log: DecisionLog | None,
                 roles: Mapping[str, str]) -> None:
        self.memory = ConversationMemory(entries)
        self.decision_log = decision_log
        self.roles = dict(roles)  # backend name -> role
        self.found_in_log = 0  # follow-ups found in the decision log (not in the LRU)

    async def earlier(self, rreq: RoutingRequest) -> Earlier | None:
        """The turn ``rreq`` follows, None when it is not a follow-up of one this router
        (or a replica sharing its decision log) answered."""
        long = sum(len(m.content) for m in rreq.messages) > INLINE_HASH_CHARS
        key = await asyncio.to_thread(follow_up_key, rreq) if long else follow_up_key(rreq)
        if key is None:
            return None
        found = self.memory.get(key)
        if found is not None or self.decision_log is None:
            return found
        try:
            found = await asyncio.to_thread(self._from_log, self.decision_log, key)
        except DecisionLogUnavailable as exc:  # serve it as a first turn
            log.info("conversation lookup skipped: decision log unavailable (%s)", exc)
            return None
        if found is not None:
            self.found_in_log += 1
            self.memory.put(key, found)
        return found

    def _from_log(self, dlog: DecisionLog, key: str) -> Earlier | None:
        r = dlog.answered_turn(key)
        if r is None:
            return None
        role = self.roles.get(r["backend"])
        if role is None:  # a backend this router no longer has
            return None
        return Earlier(role, int(r["prompt_tokens"] or 0) + int(r["completion_tokens"] or 0))

    def remember(self, rreq: RoutingRequest, answer: str, role: str,
                 prompt_tokens: int | None, completion_tokens: int | None) -> str:
        """Remember the turn just answered by ``role``; returns its key (the row's
        ``turn_key``)."""
        key = answer_key(rreq, answer)
        self.memory.put(key, Earlier(role, (prompt_tokens or 0) + (completion_tokens or 0)))
        return key


class TextTap:
    """A backend stream as :func:`router.streaming.sse_events` reads it, keeping the text
    it passes on (the answer a follow-up turn will resend)."""

    def __init__(self, stream: BackendStream) -> None:
        self.stream = stream
        self.slot = stream.slot
        self.parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.parts)

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        async for chunk in self.stream:
            if chunk.text:
                self.parts.append(chunk.text)
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()

    def as_stream(self) -> BackendStream:
        """This tap where a :class:`~router.pool.BackendStream` is expected (it has the
        three things a consumer uses: iteration, ``slot`` and ``aclose``)."""
        return cast("BackendStream", self)
