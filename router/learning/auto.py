"""The loop runs itself (#24 item 3): a profile's ``learning:`` setting retrains, gates, reloads
and rolls back in the router process, without anyone calling ``/admin/reload``.

:class:`AutoLearner` is one asyncio task per router. Every ``poll_s`` it reads how many scored
references the decision log holds (every replica's); when ``retrain_every`` more have arrived
since the last retrain (by any replica: the count is in the log's ``learning_events``), it
runs one :meth:`router.learning.loop.LearningLoop.step` on the log's labelled requests:
rollback check, candidate, gate, promote or refuse. The step runs on a worker thread of its
own at the lowest CPU priority (nice 19), never on the event loop, so the router answers
during a retrain. A promoted (or rolled back) artifact is served through the router's
:class:`router.reload.Reloader` (the gate has already judged it: ``force``); a failed or
refused candidate changes nothing. A manual ``POST /admin/reload`` while a retrain runs is a
409 ``retrain_running`` (:attr:`AutoLearner.busy`).

Every step is a row of ``learning_events`` (``archroute learning history`` prints them) and a
metric (:class:`LearningCollector`). Replicas sharing a PostgreSQL log train one at a time
(:class:`router.learning.trainlock.TrainerLock`: ``pg_try_advisory_lock``; a SQLite log:
a file lock beside it), and
the others follow: a ``promoted`` or ``rolled_back`` row another process wrote is reloaded
from its path when that folder is reachable (a shared volume), and so is the last one at
start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.decision_log import DecisionLog, read_log
from router.learning import gate as Gt
from router.learning.logrows import routing_request
from router.learning.loop import Labelled, LearningLoop, Served
from router.learning.trainlock import TrainerLock

log = logging.getLogger(__name__)

LIVE_CHANGES = ("promoted", "rolled_back")  # events after which the live artifact differs


class RoutingState(Protocol):
    @property
    def policies(self) -> dict[str, Any]: ...


class Service(Protocol):
    """What the loop needs of the router (:class:`router.serving.RouterService`; a
    Protocol, as router.serving imports this package): the policies serving now and the
    decision log."""

    @property
    def state(self) -> RoutingState: ...

    @property
    def decision_log(self) -> DecisionLog | None: ...


class Reloads(Protocol):
    """:class:`router.reload.Reloader`, which imports the policies (and they this package)."""

    async def reload(self, path: str | None = None, force: bool = False) -> dict: ...


class LearningSettings(Protocol):
    """A profile's ``learning`` block (:class:`router.settings.LearningSettings`)."""

    enabled: bool
    retrain_every: int
    min_labels: int
    refit: str
    workdir: str
    poll_s: float


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _low_priority() -> None:
    """A worker thread's initializer: the lowest CPU priority for this thread only (Linux
    applies ``setpriority`` to a thread id)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def labelled(rows: list[dict]) -> list[Labelled]:
    """The loop's rows from decision-log rows: the gate's and training's usable rows
    (:func:`router.learning.gate.log_rows`), oldest first."""
    out = []
    for r in sorted(Gt.log_rows(rows, True) + Gt.log_rows(rows, False), key=lambda r: r["id"]):
        req = routing_request(r)
        if req is None:
            continue
        out.append(Labelled(str(r["request_id"]), req, int(r["decision"] == "transformer"),
                            float(r["propensity"]), float(r["loss_transformer"]),
                            float(r["loss_hybrid"]), time=float(r["time"])))
    return out


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


class AutoLearner:
    """The learning profile's loop in a router process (see the module docstring)."""

    def __init__(self, service: Service, reloader: Reloads, profile: str,
                 learning: LearningSettings, target: str) -> None:
        self.service, self.reloader, self.profile = service, reloader, profile
        self.settings, self.target = learning, target
        assert service.decision_log is not None
        self.dlog: DecisionLog = service.decision_log
        self.replica = replica_id()
        self.lock = TrainerLock(target)
        # one thread retrains, one reads the log: both at the lowest priority
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="learning",
                                        initializer=_low_priority)
        self._task: asyncio.Task | None = None
        self.loop: LearningLoop | None = None
        self.retraining_since: float | None = None  # monotonic, while a retrain runs
        self.labels = 0  # scored references in the log at the last poll
        self.labels_at_retrain = 0  # at the last retrain (any replica's)
        self.last_event_id = 0  # learning_events read so far
        # the log's last promotion of this profile (its row), None after a rollback: the
        # artifact it replaced is the one a rollback restores, on any replica
        self.promotion: dict | None = None
        self.counters: Counter = Counter()  # events this process wrote
        self.gate: dict = {}  # the last gate's figures
        self.retrains = 0

    @classmethod
    def from_settings(cls, service: Service, reloader: Reloads, settings: Any) -> AutoLearner:
        """The learner of the profile with ``learning`` on (:class:`router.settings.Settings`
        allows one, and requires a decision log for it)."""
        name = next(n for n, p in settings.profiles.items() if p.learns)
        return cls(service, reloader, name, settings.profiles[name].learning,
                   settings.decision_log)

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        policy = self.service.state.policies.get(self.profile)
        base = getattr(policy, "model_", None)
        if base is None:
            log.error("learning: profile %s has no classifier artifact (it fell back to the "
                      "rules); the loop does not run", self.profile)
            return
        work = Path(self.settings.workdir) / self.profile
        self.loop = LearningLoop(base, work, refit=self.settings.refit,
                                 min_labels=self.settings.min_labels,
                                 live=Served.of(base, self._name(base)))
        # a candidate says it was trained on the log: a manual reload of one is gated
        self.loop.training_data = {"decision_log": self.dlog.store.describe()}
        try:  # the log's last promotion serves again
            self.labels = await self._db(self.dlog.label_count)
            await self._follow(start=True)
        except Exception:  # noqa: BLE001 - a log unreachable now: the polls try again
            log.exception("learning: the decision log's history could not be read at start")
        self._task = asyncio.create_task(self._run(), name="learning-loop")
        log.info("learning: profile %s retrains every %d new labels (refit %s, at least %d "
                 "training labels), candidates in %s", self.profile,
                 self.settings.retrain_every, self.settings.refit, self.settings.min_labels,
                 work)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=False, cancel_futures=True)

    def busy(self) -> str | None:
        """Why a manual reload must wait (a retrain is running), or None."""
        if self.retraining_since is None:
            return None
        return (f"the learning loop of profile {self.profile} is retraining (for "
                f"{time.monotonic() - self.retraining_since:.0f} s); its candidate is judged "
                "by the gate and reloaded if it passes: retry when it is done")

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a log that cannot be read now: next poll
                log.exception("learning: poll failed")
            await asyncio.sleep(self.settings.poll_s)

    async def tick(self) -> None:
        """One poll: follow other replicas' steps, count labels, retrain when due."""
        await self._follow()
        self.labels = await self._db(self.dlog.label_count)
        if self.labels - self.labels_at_retrain >= self.settings.retrain_every:
            await self.retrain()

    # --- following the log's history (other replicas, a restart) -------------------------
    async def _follow(self, start: bool = False) -> None:
        events = await self._db(self.dlog.learning_events, self.last_event_id)
        mine = [e for e in events if e["profile"] == self.profile]
        if events:
            self.last_event_id = int(events[-1]["id"])
        for e in mine:
            if e["event"] == "retrain_started" and e["labels"] is not None:
                self.labels_at_retrain = max(self.labels_at_retrain, int(e["labels"]))
            elif e["event"] in LIVE_CHANGES:
                self.promotion = e if e["event"] == "promoted" else None
        changes = [e for e in mine if e["event"] in LIVE_CHANGES
                   and (start or e["replica"] != self.replica)]
        if changes:
            last = changes[-1]
            why = (f"{last['event']} by {last['replica']}" if not start else
                   f"the log's last {last['event']} (at start)")
            await self._serve(last["path"], why, last["candidate"])

    async def _serve(self, path: str | None, why: str, sha: str | None) -> None:
        """Reload the artifact at ``path`` (the gate has judged it) and record it."""
        from router.errors import APIError

        t0 = time.perf_counter()
        if not path or not Path(path).is_dir():
            await self._record("reload_failed", candidate=sha, path=path, reason=(
                f"{why}: the artifact folder {path!r} is not reachable from this replica; "
                "the current artifact keeps serving"))
            return
        try:
            out = await self.reloader.reload(path, force=True)
        except APIError as exc:
            await self._record("reload_failed", candidate=sha, path=path,
                               reason=f"{why}: {exc.message}")
            return
        await self._record("reloaded", candidate=(out["artifact"].get("sha256") or "")[:12],
                           path=path, seconds=time.perf_counter() - t0, reason=why)

    async def _record(self, event: str, **kw: Any) -> None:
        row = self._row(event, **kw)
        await self._db(self._write, row)

    def _row(self, event: str, **kw: Any) -> dict:
        live = self._serving()
        row = {"time": time.time(), "profile": self.profile, "event": event,
               "replica": self.replica, "labels": self.labels,
               "live": self._name(live) if live is not None else None,
               "live_path": str(getattr(live, "path", None) or "") or None}
        row.update({k: v for k, v in kw.items() if v is not None})
        return row

    def _write(self, row: dict) -> None:
        self.counters[row["event"]] += 1
        if row["event"] in ("promoted", "refused", "rolled_back"):
            self.gate = {k: row.get(k) for k in ("difference", "ci_low", "ci_high")}
        log.info("learning: %s", {k: v for k, v in row.items() if k != "time"})
        try:
            self.dlog.add_learning_event(row)
        except Exception as exc:  # noqa: BLE001 - the step happened; its row is lost
            log.error("learning: could not record %s: %s", row["event"], exc)

    # --- one retrain ---------------------------------------------------------------------
    def _serving(self) -> Any:
        return getattr(self.service.state.policies.get(self.profile), "model_", None)

    @staticmethod
    def _name(clf: Any) -> str:
        return (getattr(clf, "sha256", None) or "")[:12]

    async def retrain(self) -> None:
        """One step of the loop on the worker thread; serve what it promotes or restores."""
        if self.loop is None:
            return
        self.retraining_since = time.monotonic()
        try:
            changed = await self._db(self._step)
        finally:
            self.retraining_since = None
        if changed is not None:
            await self._serve(*changed)

    def _step(self) -> tuple[str, str, str] | None:
        """Under the trainer lock: record the start, run :meth:`LearningLoop.step`, record
        its events; the artifact to serve if the live one changed."""
        assert self.loop is not None
        with self.lock.held() as mine:
            if not mine:
                log.info("learning: another replica is retraining; this one waits")
                return None
            # another replica may have retrained while this one waited for the lock
            for e in self.dlog.learning_events(self.last_event_id):
                if e["profile"] == self.profile and e["event"] == "retrain_started":
                    self.labels_at_retrain = max(self.labels_at_retrain, int(e["labels"] or 0))
            n = self.dlog.label_count()
            if n - self.labels_at_retrain < self.settings.retrain_every:
                return None
            self.labels, self.labels_at_retrain = n, n
            self.retrains += 1
            self._write(self._row("retrain_started"))
            t0 = time.perf_counter()
            try:
                return self._run_step()
            except Exception as exc:  # noqa: BLE001 - the live artifact stays; recorded
                log.exception("learning: the retrain failed")
                self._write(self._row("failed", reason=f"{type(exc).__name__}: {exc}"[:500],
                                      seconds=time.perf_counter() - t0))
                return None

    def _previous(self, serving: Any) -> Served | None:
        """The artifact the serving one replaced, when the log's last promotion made it live
        (a restart, another replica's promotion): what a rollback would restore."""
        from classifiers import artifact as A

        p = self.promotion
        if p is None or p["candidate"] != self._name(serving) or not p.get("live_path"):
            return None
        try:
            return Served.of(A.load(p["live_path"], verify=True, strict=True), p["live"])
        except (A.ArtifactError, OSError, ValueError) as exc:
            log.warning("learning: the artifact before %s cannot be loaded from %s (%s): no "
                        "rollback to it", p["candidate"], p["live_path"], exc)
            return None

    def _run_step(self) -> tuple[str, str, str] | None:
        loop = self.loop
        assert loop is not None
        t0 = time.perf_counter()
        serving = self._serving()
        if serving is not None and (loop.live is None
                                    or self._name(loop.live.clf) != self._name(serving)):
            # a manual reload, or another replica's promotion: the loop judges what serves
            loop.live = Served.of(serving, self._name(serving))
            loop.previous = self._previous(serving)
        rows = labelled(read_log(self.target, labelled_only=True))
        loop.rows = rows
        since = self.promotion["time"] if self.promotion is not None else math.inf
        loop.promoted_at = sum(1 for r in rows if r.time < since)
        loop.workdir = (Path(self.settings.workdir) / self.profile /
                        f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}")
        before = len(loop.history)
        try:
            loop.step()
        except Exception as exc:  # noqa: BLE001 - a failed step never replaces the live one
            log.exception("learning: the retrain failed")
            loop.history.append({"event": "failed", "reason": f"{type(exc).__name__}: {exc}"})
        live_path = str(getattr(serving, "path", None) or "") or None
        out = None
        for ev in loop.history[before:]:
            kind = ev["event"]
            gate = ev.get("gate") or {}
            ci = gate.get("ci") or [None, None]
            row = self._row(kind, reason=ev.get("reason"), seconds=time.perf_counter() - t0,
                            live_path=live_path, held_back=gate.get("n"),
                            serving=_num(gate.get("serving")),
                            candidate_value=_num(gate.get("candidate")),
                            difference=_num(gate.get("difference")), ci_low=_num(ci[0]),
                            ci_high=_num(ci[1]))
            if kind in ("promoted", "refused"):
                row.update(candidate=ev.get("candidate"), path=ev.get("path"))
            if kind == "rolled_back":
                # the artifact restored (the event names it: a promotion later in the same
                # step changes loop.live again)
                row.update(candidate=ev.get("to"), path=ev.get("to_path"))
                out = (row["path"], "rolled back: " + str(ev.get("reason")), row["candidate"])
                self.promotion = None
            if kind == "promoted":
                out = (row["path"], "promoted: " + str(ev.get("reason")), row["candidate"])
                self.promotion = row
            self._write(row)
        return out


class LearningCollector(Collector):
    """The learning loop in ``/metrics``, read when scraped."""

    def __init__(self, learner: AutoLearner) -> None:
        self.learner = learner

    def collect(self) -> Iterator[Metric]:
        a, labels = self.learner, [self.learner.profile]
        events = CounterMetricFamily("archroute_learning_events", "learning loop steps this "
                                     "router recorded, by profile and event (retrain_started, "
                                     "promoted, refused, failed, skipped, rolled_back, "
                                     "reloaded, reload_failed)", labels=["profile", "event"])
        for ev in ("retrain_started", "promoted", "refused", "failed", "skipped", "rolled_back",
                   "reloaded", "reload_failed"):
            events.add_metric([a.profile, ev], a.counters[ev])
        yield events
        for name, doc, value in (
                ("archroute_learning_labels", "scored references in the decision log",
                 a.labels),
                ("archroute_learning_labels_since_retrain", "scored references since the "
                 "last retrain (any replica's); a retrain starts at retrain_every",
                 max(0, a.labels - a.labels_at_retrain)),
                ("archroute_learning_retraining", "1 while this router retrains",
                 int(a.retraining_since is not None)),
                ("archroute_learning_gate_difference", "the last gate's DR difference, "
                 "candidate - serving (nats/token; NaN before the first)",
                 a.gate.get("difference")),
                ("archroute_learning_gate_ci_low", "the lower end of its 95% CI",
                 a.gate.get("ci_low"))):
            g = GaugeMetricFamily(name, doc, labels=["profile"])
            g.add_metric(labels, float("nan") if value is None else float(value))
            yield g
