"""The decision log's two stores, one schema: a SQLite file, or a PostgreSQL database that
several router replicas share (a ``postgresql://`` URL). Each connects (creating the tables and
adding missing columns), opens transactions and reads rows as dicts; :func:`read_log` reads a
whole log for offline evaluation and retraining."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from router.decision_log.schema import (
    FEEDBACK_SCHEMA,
    INDEXES,
    LABELS_SCHEMA,
    LEARNING_SCHEMA,
    MIGRATIONS,
    SCHEMA,
)

_PG_LOCK = 7_270_016  # advisory lock id: replicas starting together create the schema once


class DecisionLogUnavailable(RuntimeError):
    """The database cannot be reached or refused the statement for a reason of its own
    (down, restarting, locked, disk full): retry later. Raised by the synchronous calls
    (feedback); the writer buffers instead."""


def is_postgres(target: str | Path) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def redact_url(target: str) -> str:
    """A database URL with its password shown as ``**********`` (paths unchanged)."""
    return re.sub(r"^(postgres(?:ql)?://[^:/@]*:)[^@]*@", r"\1**********@", target)


class SQLiteStore:
    """A SQLite file (WAL, ``synchronous=FULL``; a new file is the owner's only)."""

    param = "?"
    errors: tuple[type[Exception], ...] = (sqlite3.OperationalError,)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def connect(self) -> sqlite3.Connection:
        # a new file (and so its -wal and -shm files, which SQLite creates with the main
        # file's mode) is the owner's only: it can hold prompts. Only a new one: closing a
        # descriptor of an open database drops every POSIX lock this process holds on it,
        # its other connections' included (SQLite's "how to corrupt", 2.2: disk I/O errors)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
        # switching a new file to WAL needs it unlocked, and SQLite answers "database is
        # locked" at once (no busy wait) while another process creates its schema: retry
        deadline = time.monotonic() + 10.0
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.02)
        conn.execute("PRAGMA synchronous=FULL")
        # the schema and its migrations under the write lock: two processes opening one new
        # log at the same moment take turns, and the second sees the first's columns (else
        # both add them and one dies on "duplicate column name")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(SCHEMA)
            have = {r[1] for r in conn.execute("PRAGMA table_info(decisions)")}
            for col, ddl in MIGRATIONS.items():
                if col not in have:
                    conn.execute(ddl)
            for ddl in (FEEDBACK_SCHEMA, LABELS_SCHEMA, LEARNING_SCHEMA, *INDEXES):
                conn.execute(ddl)
            conn.commit()
        except BaseException:
            conn.rollback()
            conn.close()
            raise
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


def pg(sql: str) -> str:
    """SQLite's DDL and placeholders for PostgreSQL: 8-byte floats (unix seconds need them),
    an identity key, idempotent column additions, ``%s`` parameters."""
    sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
    sql = sql.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY")
    sql = sql.replace("ADD COLUMN ", "ADD COLUMN IF NOT EXISTS ")
    return sql.replace("?", "%s")


class PostgresStore:
    """A PostgreSQL database (``psycopg``, imported only here), shared by replicas."""

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
            for ddl in (SCHEMA, *MIGRATIONS.values(), FEEDBACK_SCHEMA, LABELS_SCHEMA,
                        LEARNING_SCHEMA, *INDEXES):
                conn.execute(pg(ddl))  # type: ignore[arg-type]
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


Store = SQLiteStore | PostgresStore


def open_store(target: str | Path) -> Store:
    """The store for a SQLite path or a ``postgresql://`` URL (nothing connected yet)."""
    return PostgresStore(str(target)) if is_postgres(target) else SQLiteStore(target)


def _read(target: str | Path, sql: str, args: tuple = ()) -> list[dict]:
    """One query on a fresh connection to a log (a SQLite path must exist: nothing is
    created)."""
    if not is_postgres(target) and not Path(target).is_file():
        raise FileNotFoundError(f"no decision log at {target}")
    store = open_store(target)
    conn = store.connect()  # brings an older file's columns up to date, as the router does
    try:
        with store.transaction(conn) as cur:
            cur.execute(sql if isinstance(store, SQLiteStore) else pg(sql), args)
            return store.rows(cur)
    finally:
        conn.close()


def read_log(target: str | Path, labelled_only: bool = False) -> list[dict]:
    """Every decision row of a log with its feedback (``reward``, ``feedback_kind``) and
    label (``label_status``, ``loss_transformer``, ``loss_hybrid``, ``gap``), oldest first;
    JSON columns decoded. ``labelled_only``: only rows with a scored reference. A SQLite
    path must exist (nothing is created)."""
    rows = _read(target, "SELECT d.*, f.reward AS reward, f.kind AS feedback_kind, "
                 "l.status AS label_status, l.loss_transformer AS loss_transformer, "
                 "l.loss_hybrid AS loss_hybrid, l.gap AS gap, l.n_tokens AS label_tokens "
                 "FROM decisions d LEFT JOIN feedback f ON f.request_id = d.request_id "
                 "LEFT JOIN labels l ON l.request_id = d.request_id"
                 + (" WHERE l.status = 'done'" if labelled_only else "") + " ORDER BY d.id")
    for r in rows:
        for k in ("features", "span", "request", "conversation"):
            if isinstance(r.get(k), str):
                r[k] = json.loads(r[k])
    return rows


LEARNING_EVENTS_SQL = "SELECT * FROM learning_events WHERE id > ? ORDER BY id"


def read_learning_events(target: str | Path, after_id: int = 0) -> list[dict]:
    """The learning loop's history (table ``learning_events``), oldest first."""
    return _read(target, LEARNING_EVENTS_SQL, (after_id,))
