"""The decision log: one row per request, written by one background thread; beside it the
outcomes clients report (``feedback``: a reward per response; ``labels``: a reference answer
scored under both backends), and a retention period.

Two stores, one schema. A path is a SQLite file; a ``postgresql://`` URL is a PostgreSQL
database (``psycopg``, the ``postgres`` extra, imported only then), which several router
replicas can share: feedback for a response one replica served is accepted by any other.

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
import math
import os
import queue
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,            -- unix seconds
    request_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,        -- chat | completion
    model TEXT NOT NULL,           -- as requested (a profile or a backend name)
    profile TEXT,
    policy TEXT,
    score REAL,                    -- P(transformer better), NULL when routing was bypassed
    threshold REAL,
    decision TEXT,                 -- role the router chose (after exploration): transformer | hybrid
    backend TEXT,                  -- backend that served (NULL when none did)
    fallback_from TEXT,
    features TEXT,                 -- JSON object of the policy's cues
    latency_ms REAL,
    overhead_ms REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    stream INTEGER,
    status INTEGER,                -- HTTP status sent (200 even if a stream failed later)
    error TEXT,
    prompt TEXT,                   -- only when log_prompts is on
    side INTEGER DEFAULT 0,        -- 1: a chat app's side request (title, tags, ...), unscored
    span TEXT                      -- span profiles: JSON {gate, transformer, hybrid, switches, catchup}
)"""
# columns added after the first release: added to older files when they are opened
MIGRATIONS = {"side": "ALTER TABLE decisions ADD COLUMN side INTEGER DEFAULT 0",
              "span": "ALTER TABLE decisions ADD COLUMN span TEXT",
              # P(the router chose `decision`): 1 - epsilon, epsilon when explored, 1 when
              # deterministic; NULL for rows logged before propensities were
              "propensity": "ALTER TABLE decisions ADD COLUMN propensity REAL",
              # 1: exploration sent it to the backend the policy did not pick
              "explored": "ALTER TABLE decisions ADD COLUMN explored INTEGER",
              # only when log_prompts: JSON {kind, messages, max_tokens}, the request as the
              # policy saw it (offline evaluation and retraining rebuild its features)
              "request": "ALTER TABLE decisions ADD COLUMN request TEXT",
              # the classifier artifact that scored it (sha256, 12 hex digits)
              "artifact": "ALTER TABLE decisions ADD COLUMN artifact TEXT"}
FEEDBACK_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY,   -- the response's id
    time REAL NOT NULL,            -- unix seconds, when it was received
    reward REAL NOT NULL,          -- in [-1, 1]; thumbs up = 1, thumbs down = -1
    kind TEXT NOT NULL             -- reward | thumbs
)"""
LABELS_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    request_id TEXT PRIMARY KEY,   -- the response's id
    time REAL NOT NULL,            -- when the reference was received
    reference TEXT NOT NULL,       -- the reference answer a client sent
    reference_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,          -- queued | done | failed
    loss_transformer REAL,         -- nats/token of the reference under each backend
    loss_hybrid REAL,
    gap REAL,                      -- loss_transformer - loss_hybrid (positive: hybrid better)
    n_tokens INTEGER,
    pair TEXT,                     -- transformer|hybrid backend names
    error TEXT,
    scored_time REAL
)"""
INDEXES = ("CREATE INDEX IF NOT EXISTS decisions_request_id ON decisions (request_id)",
           "CREATE INDEX IF NOT EXISTS decisions_time ON decisions (time)")
RETENTION_INTERVAL_S = 3600.0  # the writer prunes at most this often (and when it starts)
_HURRY = object()  # queued by a reader waiting for a row: commit the current batch now
_PG_LOCK = 7_270_016  # advisory lock id: replicas starting together create the schema once
MAX_BUFFERED_ROWS = 10_000  # rows kept while the database is unreachable (then the oldest go)
_RETRY_S = (0.25, 5.0)  # the writer's first retry after a failed write, and its longest wait


class DecisionLogUnavailable(RuntimeError):
    """The database cannot be reached or refused the statement for a reason of its own
    (down, restarting, locked, disk full): retry later. Raised by the synchronous calls
    (feedback); the writer buffers instead."""


def is_postgres(target: str | Path) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def redact_url(target: str) -> str:
    """A database URL with its password shown as ``**********`` (paths unchanged)."""
    return re.sub(r"^(postgres(?:ql)?://[^:/@]*:)[^@]*@", r"\1**********@", target)


@dataclass
class DecisionRow:
    """One request's record, from start to log: the router builds it when the request
    arrives, :meth:`router.serving.RouterService.route` records the decision in it, serving
    adds the backend and the outcome, and the log stores it as is (one column per field,
    :data:`SCHEMA` and :data:`MIGRATIONS`). The response's headers and ``archroute`` object
    are read from it (:class:`router.serving.Route`). A new field is one line here, one
    column in ``MIGRATIONS`` and, when clients should see it, one key in ``Route.body``."""

    request_id: str
    endpoint: str
    model: str
    profile: str | None = None
    policy: str | None = None
    score: float | None = None
    threshold: float | None = None
    decision: str | None = None
    backend: str | None = None
    fallback_from: str | None = None
    features: dict[str, float] = field(default_factory=dict)
    latency_ms: float | None = None
    overhead_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    stream: bool = False
    status: int = 200
    error: str | None = None
    prompt: str | None = None
    side: bool = False
    span: dict | None = None  # span decoding's totals (tokens per model, switches, catch-up)
    propensity: float | None = None  # P(decision) under the logging router (see MIGRATIONS)
    explored: bool | None = None
    request: dict | None = None  # {kind, messages, max_tokens}: only when log_prompts
    artifact: str | None = None
    time: float = field(default_factory=time.time)


# --- the two stores ---------------------------------------------------------------------

class _SQLite:
    param = "?"
    errors: tuple[type[Exception], ...] = (sqlite3.OperationalError,)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def connect(self) -> sqlite3.Connection:
        # a new file (and so its -wal and -shm files, which SQLite creates with the main
        # file's mode) is the owner's only: it can hold prompts
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(SCHEMA)
        have = {r[1] for r in conn.execute("PRAGMA table_info(decisions)")}
        for col, ddl in MIGRATIONS.items():
            if col not in have:
                conn.execute(ddl)
        for ddl in (FEEDBACK_SCHEMA, LABELS_SCHEMA, *INDEXES):
            conn.execute(ddl)
        conn.commit()
        return conn

    @contextmanager
    def transaction(self, conn: sqlite3.Connection) -> Iterator[Any]:
        with conn:  # commits, or rolls back on an exception
            yield conn.cursor()

    @staticmethod
    def rows(cur: Any) -> list[dict]:
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def describe(self) -> str:
        return str(self.path)


def _pg(sql: str) -> str:
    """SQLite's DDL and placeholders for PostgreSQL: 8-byte floats (unix seconds need them),
    an identity key, idempotent column additions, ``%s`` parameters."""
    sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
    sql = sql.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY")
    sql = sql.replace("ADD COLUMN ", "ADD COLUMN IF NOT EXISTS ")
    return sql.replace("?", "%s")


class _Postgres:
    param = "%s"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("decision_log is a PostgreSQL URL but psycopg is not installed: "
                               "pip install 'archroute[postgres]' (psycopg[binary])") from None
        self.url = url
        # a server that is down, restarting or dropped the connection
        self.errors: tuple[type[Exception], ...] = (psycopg.OperationalError,
                                                    psycopg.InterfaceError)

    def connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.url, connect_timeout=10, autocommit=True)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
            for ddl in (SCHEMA, *MIGRATIONS.values(), FEEDBACK_SCHEMA, LABELS_SCHEMA, *INDEXES):
                conn.execute(_pg(ddl))  # type: ignore[arg-type]
        return conn

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        with conn.transaction(), conn.cursor() as cur:
            yield cur

    @staticmethod
    def rows(cur: Any) -> list[dict]:
        names = [d.name for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def describe(self) -> str:
        return redact_url(self.url)


def _store(target: str | Path) -> _SQLite | _Postgres:
    return _Postgres(str(target)) if is_postgres(target) else _SQLite(target)


class DecisionLog:
    """Append rows from the event loop without blocking it (``write`` only enqueues); read
    and write feedback synchronously (call those from a worker thread)."""

    def __init__(self, path: str | Path, log_prompts: bool = False,
                 batch_window_s: float = 0.05, retention_days: float | None = None,
                 retention_interval_s: float = RETENTION_INTERVAL_S,
                 clock: Callable[[], float] = time.time,
                 max_buffered_rows: int = MAX_BUFFERED_ROWS) -> None:
        self.target = str(path)
        self.store = _store(path)
        self.path = Path(path) if isinstance(self.store, _SQLite) else None
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
        return _pg if isinstance(self.store, _Postgres) else (lambda s: s)

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
                for k in ("span", "request"):
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

    # --- feedback: synchronous, committed before the caller answers --------------------
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

    def lookup(self, request_id: str) -> dict | None:
        """The served decision with this response id as committed now, or None: one query,
        no waiting (:meth:`find` waits; the router's feedback waits without a thread).
        :class:`DecisionLogUnavailable` while this process holds the row uncommitted (the
        database was unreachable): it exists, but cannot be read yet."""
        if self.is_pending(request_id):
            raise DecisionLogUnavailable(f"the decision {request_id!r} is not written yet "
                                         "(the database was unreachable)")
        rows = self._query("SELECT request_id, time, endpoint, model, profile, policy, "
                           "decision, backend, fallback_from, status, prompt, request, "
                           "propensity, explored, side FROM decisions WHERE request_id = ? "
                           "AND backend IS NOT NULL ORDER BY id DESC LIMIT 1", (request_id,))
        return rows[0] if rows else None

    def find(self, request_id: str, wait_s: float = 2.0) -> dict | None:
        """:meth:`lookup`, blocking: a row this process wrote but has not committed yet is
        waited for (up to ``wait_s``); one another replica wrote is looked for again after
        two batch windows (its writer's delay). For scripts and tests: it holds its thread
        while it waits."""
        with self._committed:
            if request_id in self._pending and wait_s > 0:
                self._queue.put(_HURRY)  # don't wait out the batch window
            self._committed.wait_for(lambda: request_id not in self._pending or self.outage,
                                     wait_s)
        row = self.lookup(request_id)
        if row is None and wait_s > 0:
            time.sleep(4 * self.batch_window_s)
            row = self.lookup(request_id)
        return row

    def add_feedback(self, request_id: str, reward: float, kind: str) -> tuple[str, float]:
        """Store a reward for a response: ``("new" | "duplicate" | "conflict", stored
        reward)``. Committed when this returns."""
        with self._tx() as cur:
            cur.execute(self.sql("INSERT INTO feedback (request_id, time, reward, kind) "
                                 "VALUES (?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING"),
                        (request_id, self.clock(), reward, kind))
            if cur.rowcount == 1:
                return "new", reward
            cur.execute(self.sql("SELECT reward FROM feedback WHERE request_id = ?"),
                        (request_id,))
            stored = float(cur.fetchone()[0])
        return ("duplicate" if math.isclose(stored, reward, abs_tol=1e-12) else "conflict"), stored

    def add_reference(self, request_id: str, reference: str, sha256: str) -> str:
        """Queue a reference answer for scoring: ``"new" | "duplicate" | "conflict"``."""
        with self._tx() as cur:
            cur.execute(self.sql("INSERT INTO labels (request_id, time, reference, "
                                 "reference_sha256, status) VALUES (?, ?, ?, ?, 'queued') "
                                 "ON CONFLICT (request_id) DO NOTHING"),
                        (request_id, self.clock(), reference, sha256))
            if cur.rowcount == 1:
                return "new"
            cur.execute(self.sql("SELECT reference_sha256 FROM labels WHERE request_id = ?"),
                        (request_id,))
            stored = cur.fetchone()[0]
        return "duplicate" if stored == sha256 else "conflict"

    def drop_reference(self, request_id: str) -> None:
        """Undo :meth:`add_reference` (its scoring could not be queued)."""
        with self._tx() as cur:
            cur.execute(self.sql("DELETE FROM labels WHERE request_id = ? AND status = 'queued'"),
                        (request_id,))

    def set_label(self, request_id: str, status: str, loss_transformer: float | None = None,
                  loss_hybrid: float | None = None, gap: float | None = None,
                  n_tokens: int | None = None, pair: str | None = None,
                  error: str | None = None) -> None:
        """Record a reference's scores (status ``done``) or why it could not be scored."""
        with self._tx() as cur:
            cur.execute(self.sql("UPDATE labels SET status = ?, loss_transformer = ?, "
                                 "loss_hybrid = ?, gap = ?, n_tokens = ?, pair = ?, error = ?, "
                                 "scored_time = ? WHERE request_id = ?"),
                        (status, loss_transformer, loss_hybrid, gap, n_tokens, pair, error,
                         self.clock(), request_id))

    def queued_references(self, limit: int) -> list[tuple[str, str]]:
        """(request id, reference) of references acknowledged but not scored yet (a
        restart picks them up again)."""
        rows = self._query("SELECT request_id, reference FROM labels WHERE status = 'queued' "
                           "ORDER BY time LIMIT ?", (limit,))
        return [(r["request_id"], r["reference"]) for r in rows]

    def outcome(self, request_id: str) -> dict:
        """The feedback and label stored for a response (each None when absent)."""
        fb = self._query("SELECT time, reward, kind FROM feedback WHERE request_id = ?",
                         (request_id,))
        lb = self._query("SELECT time, status, loss_transformer, loss_hybrid, gap, n_tokens, "
                         "pair, error FROM labels WHERE request_id = ?", (request_id,))
        return {"feedback": fb[0] if fb else None, "label": lb[0] if lb else None}


# --- reading a log (offline evaluation, retraining) ------------------------------------

def read_log(target: str | Path) -> list[dict]:
    """Every decision row of a log with its feedback (``reward``, ``feedback_kind``) and
    label (``label_status``, ``loss_transformer``, ``loss_hybrid``, ``gap``), oldest first;
    JSON columns decoded. A SQLite path must exist (nothing is created)."""
    if not is_postgres(target) and not Path(target).is_file():
        raise FileNotFoundError(f"no decision log at {target}")
    store = _store(target)
    conn = store.connect()  # brings an older file's columns up to date, as the router does
    try:
        with store.transaction(conn) as cur:
            cur.execute("SELECT d.*, f.reward AS reward, f.kind AS feedback_kind, "
                        "l.status AS label_status, l.loss_transformer AS loss_transformer, "
                        "l.loss_hybrid AS loss_hybrid, l.gap AS gap, l.n_tokens AS label_tokens "
                        "FROM decisions d LEFT JOIN feedback f ON f.request_id = d.request_id "
                        "LEFT JOIN labels l ON l.request_id = d.request_id ORDER BY d.id")
            rows = store.rows(cur)
    finally:
        conn.close()
    for r in rows:
        for k in ("features", "span", "request"):
            if isinstance(r.get(k), str):
                r[k] = json.loads(r[k])
    return rows
