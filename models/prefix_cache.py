"""Prefix reuse for an in-process model: the caches of its last requests, resumed when a new
request's prompt starts with what one of them read (``archroute serve-model``'s
``model_server.prefix_cache``).

Span decoding over two engines (:mod:`models.span.remote`) sends each engine, at every span,
the whole sequence so far; without reuse the engine prefills all of it again. With a
:class:`PrefixCache` on the :class:`~models.hf.HFBackend`, a request continues from the
cache of an earlier request instead, and reads only the tokens after the part they share:
the catch-up the in-process span decoder does (its :class:`~models.span.decoder._Cursor`),
over HTTP.

**What an entry is**: the model's cache after a generation ended (finished, or its client
closed the stream) and the token ids it read, in order (the prompt and the answer tokens
fed back, not the last sampled one). A request takes (removes) the entry from which it can
resume furthest; when it ends, its own cache becomes an entry. At most ``entries`` are
kept, the least recently stored dropped first, so memory is bounded by ``entries`` caches
of at most the context length each (plus the hybrid's checkpoints below).

**Where a cache can resume** (position p: the cache holds exactly the first p tokens of
the new prompt, and the model reads the rest in one forward):

- attention layers (transformers' ``DynamicLayer``) drop their last positions
  (:func:`models.span.decoder.crop_cache`, the decoder's own helper), so a transformer can
  resume at any p up to the longest common prefix of what it read and the new prompt;
- recurrent and convolution state (a hybrid's Gated DeltaNet layers) cannot be rolled
  back, so while it decodes the session **checkpoints** those layers' state (a copy of the
  conv and recurrent tensors, a few hundred KB for the reference hybrid) after each of its
  last ``checkpoints`` forwards, and the hybrid can resume at the end of what it read or
  at one of those positions. An engine decodes a few tokens past the point where the span
  decoder switched away before it notices the closed stream; the checkpoints cover them;
- any other cache layer: only at the end of what it read.

p is at most the new prompt's length minus one (the model reads at least one token, whose
logits predict the next). An entry is only taken when it saves at least half of what it
holds (``2 * p >= len(entry)``), so the first request of a new conversation, sharing only
a chat template's first tokens with an entry, does not consume another conversation's
cache.

Greedy decoding with reuse gives the tokens decoding without it gives (tested on the
shipped pair through a real ``serve-model`` process; the arithmetic differs only in how a
sequence is split into forwards, as in the in-process span decoder).

Thread safety: a session runs inside the model's forward lock (:meth:`HFBackend.stream`
holds it for the whole generation); the entry list has its own lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from models.span.decoder import cache_length, crop_cache

# the last forwards after which a hybrid's recurrent and conv state is checkpointed (how
# far past a switch an engine may decode before it notices the closed stream); per entry
DEFAULT_CHECKPOINTS = 16


Mode = Literal["crop", "checkpoint", "end"]


def cache_mode(cache: Any) -> Mode:
    """How a cache can be rewound: ``crop`` (every layer is a plain attention KV layer),
    ``checkpoint`` (attention KV layers and linear-attention layers whose state is copied
    at checkpoints), or only at its ``end`` (any other layer)."""
    from transformers import cache_utils as cu

    kinds = {type(layer) for layer in getattr(cache, "layers", None) or []}
    if not kinds:
        return "end"
    if kinds == {cu.DynamicLayer}:
        return "crop"
    linear = {getattr(cu, n, None) for n in ("LinearAttentionLayer",
                                              "LinearAttentionAndFullAttentionLayer")} - {None}
    if kinds & linear and kinds <= linear | {cu.DynamicLayer}:
        return "checkpoint"
    return "end"


@dataclass
class _Checkpoint:
    """The recurrent and conv state of each linear-attention layer after ``position``
    tokens, by layer index (copies: decoding updates them in place)."""

    position: int
    layers: dict[int, tuple[dict[int, Any], dict[int, Any], Any]]


def _checkpoint(cache: Any, position: int) -> _Checkpoint:
    def copy(states: dict[int, Any]) -> dict[int, Any]:
        return {i: None if t is None else t.clone() for i, t in states.items()}

    return _Checkpoint(position, {
        i: (copy(layer.conv_states), copy(layer.recurrent_states),
            layer.cumulative_length_linear.clone())
        for i, layer in enumerate(cache.layers) if hasattr(layer, "recurrent_states")})


@dataclass
class _Entry:
    tokens: list[int]  # the ids the cache read, in order
    cache: Any  # the model's cache after reading them
    mode: Mode
    checkpoints: dict[int, _Checkpoint] = field(default_factory=dict)  # by position

    def resume_at(self, ids: Sequence[int]) -> int:
        """The furthest position this entry can resume ``ids`` at (0: none)."""
        limit = min(len(ids) - 1, len(self.tokens))
        common = 0
        while common < limit and self.tokens[common] == ids[common]:
            common += 1
        if self.mode == "crop" or common == len(self.tokens):
            return common
        return max((p for p in self.checkpoints if p <= common), default=0)

    def rewind(self, position: int) -> Any:
        """The cache holding exactly the first ``position`` tokens (this entry's cache,
        changed in place: the entry is used up)."""
        from transformers.cache_utils import DynamicLayer

        drop = len(self.tokens) - position
        if drop == 0:
            return self.cache
        if self.mode == "crop":
            crop_cache(self.cache, drop)
            return self.cache
        cp = self.checkpoints[position]
        for i, layer in enumerate(self.cache.layers):
            if i in cp.layers:
                conv, rec, length = cp.layers[i]
                layer.conv_states.update(conv)
                layer.recurrent_states.update(rec)
                layer.cumulative_length_linear = length
            if isinstance(layer, DynamicLayer):  # (its own crop, not a linear layer's)
                DynamicLayer.crop(layer, -drop)
        return self.cache


class PrefixSession:
    """One generation's use of a :class:`PrefixCache` (:meth:`PrefixCache.open`): ``cache``
    (None: a fresh one) already holds ``ids[:start]``; :meth:`read` after each forward,
    :meth:`close` when the generation ended without an error (its cache becomes an entry)."""

    def __init__(self, owner: PrefixCache, ids: Sequence[int], cache: Any, start: int) -> None:
        self.owner = owner
        self.cache = cache
        self.start = start
        self.tokens: list[int] = list(ids[:start])
        self._checkpoints: deque[_Checkpoint] = deque(maxlen=owner.checkpoints)
        self._mode: Mode | None = None  # decided at the first read

    def read(self, tokens: Sequence[int], cache: Any) -> None:
        """The model just read ``tokens`` into ``cache``."""
        self.tokens.extend(tokens)
        self.cache = cache
        if self._mode is None:
            self._mode = cache_mode(cache)
        if self._mode == "checkpoint" and self.owner.checkpoints:
            self._checkpoints.append(_checkpoint(cache, len(self.tokens)))

    def close(self) -> None:
        """Keep the cache for the next request (the owner's least recent entry may go)."""
        if self.cache is None:
            return
        if self._mode is None:  # (nothing read: a resumed cache, as it was given)
            self._mode = cache_mode(self.cache)
        if cache_length(self.cache) != len(self.tokens):  # never resume a cache we misread
            return
        cps = {c.position: c for c in self._checkpoints if c.position < len(self.tokens)}
        self.owner.store(_Entry(self.tokens, self.cache, self._mode, cps))


class PrefixCache:
    """The caches of the last ``entries`` generations of one model, and the counters
    ``/ready`` shows (``stats``). See the module docstring."""

    def __init__(self, entries: int, checkpoints: int = DEFAULT_CHECKPOINTS) -> None:
        if entries < 1:
            raise ValueError(f"prefix cache: entries must be >= 1, got {entries}")
        self.entries = entries
        self.checkpoints = checkpoints
        self._lock = threading.Lock()
        self._items: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self.requests = 0  # sessions opened
        self.hits = 0  # of them, resumed from an entry
        self.reused_tokens = 0  # prompt tokens not read again, over all hits
        self.prompt_tokens = 0  # prompt tokens of all sessions

    def open(self, ids: Sequence[int]) -> PrefixSession:
        """A session for a generation whose prompt is ``ids``: resumed from the entry that
        saves the most (taken out of the cache), or fresh."""
        with self._lock:
            best, at = None, 0
            for key, item in self._items.items():
                p = item.resume_at(ids)
                if p > at and 2 * p >= len(item.tokens):
                    best, at = key, p
            taken = self._items.pop(best) if best is not None else None
            self.requests += 1
            self.prompt_tokens += len(ids)
            if taken is not None:
                self.hits += 1
                self.reused_tokens += at
        if taken is None:
            return PrefixSession(self, ids, None, 0)
        return PrefixSession(self, ids, taken.rewind(at), at)

    def store(self, entry: _Entry) -> None:
        with self._lock:
            self._items[self._next] = entry
            self._next += 1
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def stats(self) -> dict[str, int]:
        """Counters since start: sessions, hits, prompt tokens read from a cache instead of
        recomputed, all prompt tokens; and the entries held now."""
        with self._lock:
            return {"entries": len(self._items), "max_entries": self.entries,
                    "requests": self.requests, "hits": self.hits,
                    "reused_tokens": self.reused_tokens, "prompt_tokens": self.prompt_tokens}
