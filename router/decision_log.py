"""The decision log: one SQLite row per request, written by one background thread.

WAL mode with ``synchronous=FULL``: a row the writer has committed survives a crash of the
router (and of the machine). The writer groups the rows of ``batch_window_s`` (50 ms) into
one transaction, so a busy router pays one fsync per batch, not per request; the rows of
the last window can be lost in a crash. No prompt text is stored unless ``log_prompts``.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    decision TEXT,                 -- role the policy chose: transformer | hybrid
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
              "span": "ALTER TABLE decisions ADD COLUMN span TEXT"}


@dataclass
class DecisionRow:
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
    time: float = field(default_factory=time.time)


class DecisionLog:
    """Append rows from the event loop without blocking it (``write`` only enqueues)."""

    def __init__(self, path: str | Path, log_prompts: bool = False,
                 batch_window_s: float = 0.05) -> None:
        self.path = Path(path)
        self.log_prompts = log_prompts
        self.batch_window_s = batch_window_s
        self._queue: queue.Queue[DecisionRow | None] = queue.Queue()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()  # fail at start, not at the first request
        conn.close()
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(SCHEMA)
        have = {r[1] for r in conn.execute("PRAGMA table_info(decisions)")}
        for col, ddl in MIGRATIONS.items():
            if col not in have:
                conn.execute(ddl)
        conn.commit()
        return conn

    def write(self, row: DecisionRow) -> None:
        if not self.log_prompts:
            row.prompt = None
        self._queue.put(row)

    def _run(self) -> None:
        conn = self._connect()
        cols = [f for f in DecisionRow.__dataclass_fields__]
        sql = (f"INSERT INTO decisions ({', '.join(cols)}) "
               f"VALUES ({', '.join('?' for _ in cols)})")
        stop = False
        while not stop:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.batch_window_s
            while batch[-1] is not None and len(batch) < 512:  # group rows: one fsync
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            rows = []
            for row in batch:
                if row is None:
                    stop = True
                    continue
                d = asdict(row)
                d["features"] = json.dumps(d["features"])
                d["stream"], d["side"] = int(d["stream"]), int(d["side"])
                d["span"] = None if d["span"] is None else json.dumps(d["span"])
                rows.append(tuple(d[c] for c in cols))
            try:
                with conn:
                    conn.executemany(sql, rows)
            except sqlite3.Error as exc:
                log.error("decision log: dropped %d rows: %s", len(rows), exc)
            for _ in batch:
                self._queue.task_done()
        conn.close()

    def flush(self) -> None:
        """Block until every row written so far is committed (tests, shutdown)."""
        self._queue.join()

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush queued rows and stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout_s)
