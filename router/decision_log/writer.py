"""The decision log's writer: one background thread that commits the rows of requests.

SQLite runs in WAL mode with ``synchronous=FULL``: a row the writer has committed survives a
crash of the router (and of the machine). The writer groups the rows of ``batch_window_s``
(50 ms) into one transaction, so a busy router pays one fsync per batch, not per request;
the rows of the last window can be lost in a crash. Feedback is different: it is written
and committed synchronously (:meth:`DecisionLog.add_feedback`, from a worker thread) before
the client is told 200, so an acknowledged outcome is never lost.

An outage of the database never stops serving: rows the writer cannot write stay in a
bounded buffer (``max_buffered_rows``, the oldest dropped beyond it and counted in
``dropped``) and are written when the database answers again (retried after 0.25 s, backing
off to 5 s). The synchronous calls raise :class:`DecisionLogUnavailable` meanwhile. A new
SQLite file is created readable by its owner only (0600): it holds prompts when
``log_prompts``.

Retention: with ``retention_days`` set, the writer thread deletes decisions older than that,
and their feedback and labels, when it starts and then at most once per
``retention_interval_s`` (an hour). No prompt text is stored unless ``log_prompts``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from router.decision_log.schema import DecisionRow
from router.decision_log.stores import (
    DecisionLogUnavailable,
    PostgresStore,
    SQLiteStore,
    open_store,
    pg,
)

log = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 3600.0  # the writer prunes at most this often (and when it starts)
_HURRY = object()  # queued by a reader waiting for a row: commit the current batch now
MAX_BUFFERED_ROWS = 10_000  # rows kept while the database is unreachable (then the oldest go)
_RETRY_S = (0.25, 5.0)  # the writer's first retry after a failed write, and its longest wait


class DecisionWriter:
    """Append rows from the event loop without blocking it (``write`` only enqueues: a
    background thread commits them in batches), prune old rows, and hold the synchronous
    connection the feedback API uses (:class:`router.decision_log.outcomes.DecisionLog`)."""

    def __init__(self, path: str | Path, log_prompts: bool = False,
                 batch_window_s: float = 0.05, retention_days: float | None = None,
                 retention_interval_s: float = RETENTION_INTERVAL_S,
                 clock: Callable[[], float] = time.time,
                 max_buffered_rows: int = MAX_BUFFERED_ROWS) -> None:
        self.target = str(path)
        self.store = open_store(path)
        self.path = Path(path) if isinstance(self.store, SQLiteStore) else None
        self.log_prompts = log_prompts
        self.batch_window_s = batch_window_s
        self.retention_days = retention_days
        self.retention_interval_s = retention_interval_s
        self.clock = clock
        self.max_buffered_rows = max_buffered_rows
        self._queue: queue.Queue[Any] = queue.Queue()
        # request ids written but not committed yet (queued, in the writer's batch, or
        # buffered): feedback for them waits for the commit
        self._pending: set[str] = set()
        self._committed = threading.Condition()
        # rows a write failed for (the database is unreachable), oldest first, as
        # (request id, row values): written again when it answers
        self._backlog: deque[tuple[str, tuple]] = deque()
        self._failures = 0  # consecutive failed writes
        self._retry_at = 0.0  # monotonic: no write is tried before (backing off)
        self.dropped = 0  # rows lost: beyond max_buffered_rows, or unwritten at close
        self._next_prune = 0.0
        self._sync = self.store.connect()  # fail at start, not at the first request
        self._sync_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()

    @property
    def sql(self) -> Callable[[str], str]:
        return pg if isinstance(self.store, PostgresStore) else (lambda s: s)

    @property
    def buffered(self) -> int:
        """Rows waiting for the database to come back."""
        return len(self._backlog)

    @property
    def outage(self) -> bool:
        """The writer's last write failed: its rows wait in the buffer."""
        return self._failures > 0

    # --- decisions: the background writer ---------------------------------------------
    def write(self, row: DecisionRow) -> None:
        if not self.log_prompts:
            row.prompt = row.request = None
        if self._queue.qsize() >= self.max_buffered_rows:  # the writer is stuck connecting
            self._lose(1, "the writer's queue is full")
            return
        with self._committed:
            self._pending.add(row.request_id)
        self._queue.put(row)

    def _run(self) -> None:
        conn = self._reconnect(None)
        conn = self._maybe_prune(conn)
        cols = [f for f in DecisionRow.__dataclass_fields__]
        sql = self.sql(f"INSERT INTO decisions ({', '.join(cols)}) "
                       f"VALUES ({', '.join('?' for _ in cols)})")
        # wake up now and then to prune even when no rows arrive
        wake = None if self.retention_days is None else min(self.retention_interval_s, 60.0)
        stop = False
        while not stop:
            wait = wake
            if self._backlog:  # wake up to write it again
                wait = max(0.01, min(wake or _RETRY_S[1], self._retry_at - time.monotonic()))
            try:
                first = self._queue.get(timeout=wait)
            except queue.Empty:
                conn = self._write_backlog(conn, sql)
                conn = self._maybe_prune(conn)
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_window_s
            while batch[-1] is not None and batch[-1] is not _HURRY and len(batch) < 512:
                try:  # group rows: one fsync per batch window
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            ids = []
            for row in batch:
                if row is _HURRY:
                    continue
                if row is None:
                    stop = True
                    continue
                d = asdict(row)
                d["features"] = json.dumps(d["features"])
                d["stream"], d["side"] = int(d["stream"]), int(d["side"])
                d["explored"] = None if d["explored"] is None else int(d["explored"])
                for k in ("span", "request", "conversation"):
                    d[k] = None if d[k] is None else json.dumps(d[k])
                self._backlog.append((row.request_id, tuple(d[c] for c in cols)))
                ids.append(row.request_id)
            if ids or stop:
                conn = self._write_backlog(conn, sql, now=stop)
            for _ in batch:
                self._queue.task_done()
            conn = self._maybe_prune(conn)
        if self._backlog:
            self._lose(len(self._backlog), "the database was unreachable at shutdown")
            self._settled([rid for rid, _ in self._backlog])
            self._backlog.clear()
        if conn is not None:
            conn.close()

    def _write_backlog(self, conn: Any, sql: str, now: bool = False) -> Any:
        """Write the buffered rows, oldest first, in transactions of up to 512; on a
        failure keep them (up to ``max_buffered_rows``) and retry later, backing off."""
        if not self._backlog or (not now and time.monotonic() < self._retry_at):
            self._trim()
            return conn
        conn = self._reconnect(conn)
        try:
            if conn is None:
                raise DecisionLogUnavailable("no connection")
            while self._backlog:
                chunk = [self._backlog[i] for i in range(min(512, len(self._backlog)))]
                try:
                    with self.store.transaction(conn) as cur:
                        cur.executemany(sql, [values for _, values in chunk])
                except self.store.errors:
                    raise
                except Exception as exc:  # noqa: BLE001 - the rows, not the database
                    self._write_each(conn, sql, len(chunk), exc)
                    continue
                for _ in chunk:
                    self._backlog.popleft()
                self._settled([rid for rid, _ in chunk])
        except Exception as exc:  # noqa: BLE001 - a log must never stop serving
            self._failures += 1
            delay = min(_RETRY_S[1], _RETRY_S[0] * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + delay
            log.error("decision log: %d rows buffered (the database failed: %s: %s); "
                      "retrying in %.2f s", len(self._backlog), type(exc).__name__, exc, delay)
            self._trim()
            with self._committed:  # readers waiting for a row stop waiting (outage)
                self._committed.notify_all()
            return self._drop(conn)
        if self._failures:
            log.warning("decision log: the database answers again; buffered rows written")
        self._failures, self._retry_at = 0, 0.0
        return conn

    def _write_each(self, conn: Any, sql: str, n: int, exc: Exception) -> None:
        """The first ``n`` buffered rows one at a time, after their batch was refused for
        what it holds (say a NUL character PostgreSQL refuses in text): only the rows the
        database refuses are dropped. A failure of the database itself propagates."""
        log.warning("decision log: a batch of %d rows was refused (%s: %s); writing them "
                    "one at a time", n, type(exc).__name__, exc)
        for _ in range(n):
            rid, values = self._backlog[0]
            try:
                with self.store.transaction(conn) as cur:
                    cur.execute(sql, values)
            except self.store.errors:
                raise
            except Exception as one:  # noqa: BLE001
                self._lose(1, f"row {rid!r} refused: {type(one).__name__}: {one}")
            self._backlog.popleft()
            self._settled([rid])

    def _trim(self) -> None:
        over = len(self._backlog) - self.max_buffered_rows
        if over > 0:
            self._settled([self._backlog.popleft()[0] for _ in range(over)])
            self._lose(over, f"more than {self.max_buffered_rows} rows buffered "
                             "(max_buffered_rows)")

    def _settled(self, ids: list[str]) -> None:
        """These rows are committed (or lost): nobody need wait for them any longer."""
        with self._committed:
            self._pending.difference_update(ids)
            self._committed.notify_all()

    def _lose(self, n: int, why: str) -> None:
        with self._committed:
            self.dropped += n
        log.error("decision log: dropped %d rows: %s (%d dropped so far)", n, why, self.dropped)

    def _reconnect(self, conn: Any) -> Any:
        if conn is not None and not getattr(conn, "closed", False):
            return conn
        try:
            return self.store.connect()
        except Exception as exc:  # noqa: BLE001 - retried at the next batch
            log.error("decision log: cannot connect to %s: %s", self.store.describe(), exc)
            return None

    @staticmethod
    def _drop(conn: Any) -> Any:
        """After a failed write: a PostgreSQL connection that broke is reopened next time."""
        if conn is not None and getattr(conn, "closed", False):
            return None
        return conn

    # --- retention --------------------------------------------------------------------
    def _maybe_prune(self, conn: Any) -> Any:
        if self.retention_days is None or self.clock() < self._next_prune:
            return conn
        self._next_prune = self.clock() + self.retention_interval_s
        conn = self._reconnect(conn)
        if conn is None:
            return conn
        try:
            n = self.prune(conn)
        except Exception as exc:  # noqa: BLE001
            log.error("decision log: retention failed: %s", exc)
            return self._drop(conn)
        if n:
            log.info("decision log: deleted %d decisions older than %g days", n,
                     self.retention_days)
        return conn

    def prune(self, conn: Any, now: float | None = None) -> int:
        """Delete decisions older than ``retention_days`` and their feedback and labels;
        returns how many decisions went."""
        assert self.retention_days is not None
        cutoff = (self.clock() if now is None else now) - self.retention_days * 86400.0
        old = "SELECT request_id FROM decisions WHERE time < ?"
        with self.store.transaction(conn) as cur:
            for table in ("feedback", "labels"):
                cur.execute(self.sql(f"DELETE FROM {table} WHERE request_id IN ({old}) "
                                     "OR time < ?"), (cutoff, cutoff))
            cur.execute(self.sql("DELETE FROM decisions WHERE time < ?"), (cutoff,))
            return int(cur.rowcount or 0)

    def flush(self) -> None:
        """Block until the writer has tried every row written so far: committed, or buffered
        while the database is unreachable (tests, shutdown)."""
        self._queue.join()

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush queued rows and stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        with self._sync_lock:
            self._sync.close()

    # --- the synchronous connection (feedback: committed before the caller answers) ----
    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A transaction on the synchronous connection; :class:`DecisionLogUnavailable` when
        the database cannot be reached (the next call connects again)."""
        with self._sync_lock:
            try:
                if getattr(self._sync, "closed", False):  # a PostgreSQL connection that broke
                    self._sync = self.store.connect()
                with self.store.transaction(self._sync) as cur:
                    yield cur
            except self.store.errors as exc:
                raise DecisionLogUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if self._failures and self._retry_at:  # it answers again: the writer need not wait
            self._retry_at = 0.0
            self._queue.put(_HURRY)

    def _query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._tx() as cur:
            cur.execute(self.sql(sql), args)
            return self.store.rows(cur)

    def is_pending(self, request_id: str) -> bool:
        """This process wrote the row and has not committed it yet."""
        with self._committed:
            return request_id in self._pending

    def hurry(self) -> None:
        """Ask the writer to commit its current batch now (a reader waits for a row)."""
        self._queue.put(_HURRY)
