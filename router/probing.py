"""The prompt probe at serving time (issue #24 item 4): both backends read the prompt once
(a prefill each, concurrently) and the probe's features (:mod:`classifiers.probe`) go into
the request a ``needs_probe`` policy scores.

Each backend is asked through its :class:`~router.pool.BackendSlot` (``score_prompt``), so
its concurrency limit, queue and breaker hold: a backend cooling down is not asked, and a
probe that fails counts against it as any call does. The whole probe has its own deadline
(the ``probe_timeout_s`` setting); past it the calls are cancelled (no verdict for the
breakers: a slow probe is not a failed backend) and the request is scored without the probe.

What it costs: one extra prefill of the prompt per request on each backend (the chosen
backend reads the prompt again to generate; in-process the probe's cache is not reused yet,
upstream an engine's prefix cache makes that repeat cheap). ``archroute bench route
--probe`` measures it on the embedded pair.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

from classifiers.probe import probe_features
from classifiers.request import RoutingRequest
from models.base import Prompt, PromptScore, RequestError
from router.pool import BackendSlot

FAILURES = ("timeout", "error", "refused", "mismatch")  # the fallback metric's reasons


class ProbeMismatchError(ValueError):
    """The two backends read different tokens (they do not share a tokenizer)."""


@dataclass(frozen=True)
class ProbeOutcome:
    """One request's probe: the features (None when it failed), how long it took (ms, both
    prefills and the features) and why it failed (one of :data:`FAILURES`, None when not)."""

    features: dict[str, float] | None
    ms: float
    failure: str | None = None
    detail: str | None = None  # the failure in words (logged)


def backend_prompt(rreq: RoutingRequest) -> Prompt:
    """What a backend is given for the request (as ``RouterService.request_of`` builds it):
    a completion's prompt text, or the conversation."""
    if rreq.kind == "completion" and len(rreq.messages) == 1:
        return rreq.messages[0].content
    return list(rreq.messages)


def probe_of(t: PromptScore, h: PromptScore) -> dict[str, float]:
    """The probe's features from the transformer's and the hybrid's prompt scores: token
    ids compared when both know them, else the tokens' texts (an upstream's), numbered in
    order of appearance for the repeated n-grams. :class:`ProbeMismatchError` when the two
    read different tokens."""
    if t.ids is not None and h.ids is not None:
        same, ids = t.ids == h.ids, list(t.ids)
    else:
        vocab: dict[str, int] = {}
        same, ids = t.pieces == h.pieces, [vocab.setdefault(p, len(vocab)) for p in t.pieces]
    if not same:
        raise ProbeMismatchError(f"the backends read different tokens ({len(t.pieces)} and "
                                 f"{len(h.pieces)}): do they share a tokenizer?")
    return probe_features(t.pieces, ids, t.logprobs, h.logprobs)


async def measure(slots: Mapping[str, BackendSlot], prompt: Prompt,
                  timeout_s: float) -> ProbeOutcome:
    """Ask the transformer's and the hybrid's slots for the prompt's log-probabilities,
    concurrently, and compute the features, all within ``timeout_s``. Never raises (but
    for cancellation): a failure is an outcome without features."""
    t0 = time.perf_counter()
    roles = ("transformer", "hybrid")
    unable = [slots[r].name for r in roles if not slots[r].backend.can_score_prompt]
    if unable:  # e.g. a backend over Ray Serve handles: not asked at all
        return ProbeOutcome(None, (time.perf_counter() - t0) * 1000, "refused",
                            f"{', '.join(unable)} cannot score a prompt on its own")
    tasks = [asyncio.ensure_future(slots[role].score_prompt(prompt)) for role in roles]
    for task in tasks:  # an error not raised below (the other's came first) is still read
        task.add_done_callback(lambda tk: tk.cancelled() or tk.exception())
    failure: str | None = None
    detail: str | None = None
    features = None
    try:
        async with asyncio.timeout(timeout_s):
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    raise exc
            t, h = (task.result() for task in tasks)
            features = await asyncio.to_thread(probe_of, t, h)
    except TimeoutError:
        failure, detail = "timeout", f"no answer from both backends within {timeout_s:g} s"
    except ProbeMismatchError as exc:
        failure, detail = "mismatch", str(exc)
    except RequestError as exc:
        failure, detail = "refused", str(exc)
    except Exception as exc:  # noqa: BLE001 - a backend failure: scored without the probe
        failure, detail = "error", f"{type(exc).__name__}: {exc}"
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
    return ProbeOutcome(features, (time.perf_counter() - t0) * 1000, failure, detail)
