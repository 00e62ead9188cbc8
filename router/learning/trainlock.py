"""One trainer at a time across the routers sharing a decision log (the learning loop that
runs itself, :mod:`router.learning.auto`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from router.decision_log import is_postgres

TRAINER_LOCK_ID = 7_270_017  # PostgreSQL advisory lock: one trainer across replicas


class TrainerLock:
    """One trainer at a time across the routers sharing a decision log. PostgreSQL: a
    session advisory lock (``pg_try_advisory_lock``) on a connection of its own, released
    by the server if this process dies; SQLite: a file lock (``filelock``) on
    ``LOG.trainer.lock`` beside the file. :meth:`acquire` never waits."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._conn: Any = None
        self._file: Any = None

    def acquire(self) -> bool:
        if is_postgres(self.target):
            import psycopg

            conn = psycopg.connect(self.target, connect_timeout=10, autocommit=True)
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (TRAINER_LOCK_ID,)).fetchone()
            if got is None or not got[0]:
                conn.close()
                return False
            self._conn = conn
            return True
        from filelock import FileLock, Timeout

        lock = FileLock(f"{self.target}.trainer.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        self._file = lock
        return True

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing the session releases it anyway
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (TRAINER_LOCK_ID,))
            self._conn.close()
            self._conn = None
        if self._file is not None:
            self._file.release()
            self._file = None

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """``with lock.held() as mine:`` ``mine`` is False when another trainer has it."""
        mine = self.acquire()
        try:
            yield mine
        finally:
            if mine:
                self.release()
