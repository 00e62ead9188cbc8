"""The decision log's file: committed rows survive the process being killed, the file is its
owner's only, and rows written while the database fails are buffered, then written."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from router.decision_log import DecisionLog, DecisionLogUnavailable, DecisionRow, read_log
from router.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parents[2]


def test_rows_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite"
    code = f"""
import os, signal
from router.decision_log import DecisionLog, DecisionRow
log = DecisionLog({str(db)!r})
for i in range(20):
    log.write(DecisionRow(f"r{{i}}", "chat", "archroute", score=0.5, prompt="secret"))
log.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9
    rows = sqlite3.connect(db).execute("SELECT request_id, prompt FROM decisions").fetchall()
    assert len(rows) == 20 and all(p is None for _, p in rows)  # no prompt unless enabled


def test_prompts_only_when_enabled(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "d.sqlite", log_prompts=True)
    log.write(DecisionRow("r", "chat", "m", prompt="hello"))
    log.close()
    assert sqlite3.connect(tmp_path / "d.sqlite").execute(
        "SELECT prompt FROM decisions").fetchone() == ("hello",)


def test_a_new_log_file_is_the_owners_only(tmp_path: Path) -> None:
    """The log can hold prompts: created 0600 whatever the umask (issue #21, D11), and so
    are SQLite's -wal and -shm files, which take the main file's mode."""
    old = os.umask(0o022)
    try:
        dlog = DecisionLog(tmp_path / "d.sqlite", log_prompts=True)
        dlog.write(DecisionRow("r", "chat", "m", prompt="a secret"))
        dlog.flush()
        made = sorted(p.name for p in tmp_path.iterdir())
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        dlog.close()
    finally:
        os.umask(old)
    assert "d.sqlite-wal" in made
    assert modes == dict.fromkeys(made, 0o600)


class _Outage:
    """Makes a log's database fail as an unreachable one does (the driver's operational
    error), for every connection, until ``up()``."""

    def __init__(self, dlog: DecisionLog) -> None:
        self.down = False
        real = dlog.store.transaction

        @contextmanager
        def transaction(conn):
            if self.down:
                raise sqlite3.OperationalError("disk I/O error")
            with real(conn) as cur:
                yield cur

        dlog.store.transaction = transaction  # type: ignore[method-assign]


def test_rows_written_during_an_outage_are_buffered_and_written_later(tmp_path: Path) -> None:
    """Issue #21, N4: while the database fails, rows wait in a bounded buffer (the oldest
    dropped beyond it, and counted) and are written when it answers again; the synchronous
    calls say it is unavailable instead of failing any other way."""
    path = tmp_path / "d.sqlite"
    dlog = DecisionLog(path, max_buffered_rows=5)
    outage = _Outage(dlog)
    dlog.write(DecisionRow("before", "chat", "m", backend="h"))
    dlog.flush()
    outage.down = True
    for i in range(8):
        dlog.write(DecisionRow(f"r{i}", "chat", "m", backend="h"))
        dlog.flush()  # one at a time: the buffer, not the writer's queue, is what fills
    assert (dlog.buffered, dlog.dropped, dlog.outage) == (5, 3, True)
    with pytest.raises(DecisionLogUnavailable):
        dlog.add_feedback("before", 1.0, "reward")
    with pytest.raises(DecisionLogUnavailable):  # buffered: it exists, not readable yet
        dlog.lookup("r7")
    scrape = RouterMetrics(dlog).render().decode()
    assert "archroute_decision_log_dropped_rows_total 3.0" in scrape
    assert "archroute_decision_log_buffered_rows 5.0" in scrape
    outage.down = False
    deadline = time.monotonic() + 15
    while dlog.buffered:
        assert time.monotonic() < deadline, "the buffered rows were not written"
        time.sleep(0.05)
    assert dlog.lookup("r7")["request_id"] == "r7"
    dlog.close()
    assert [r["request_id"] for r in read_log(path)] == ["before", "r3", "r4", "r5", "r6", "r7"]


def test_waiting_for_a_row_stops_when_the_database_fails(tmp_path: Path) -> None:
    dlog = DecisionLog(tmp_path / "d.sqlite")
    outage = _Outage(dlog)
    outage.down = True
    dlog.write(DecisionRow("r", "chat", "m", backend="h"))
    t = time.monotonic()
    with pytest.raises(DecisionLogUnavailable):
        dlog.find("r", wait_s=10.0)
    assert time.monotonic() - t < 5.0
    outage.down = False
    dlog.close()
    assert [r["request_id"] for r in read_log(tmp_path / "d.sqlite")] == ["r"]


def _open_logs(paths: list[str], barrier) -> None:
    from router.decision_log.stores import SQLiteStore

    for path in paths:
        barrier.wait(timeout=30)  # both open the same new file at the same moment
        SQLiteStore(path).connect().close()


def test_two_processes_creating_one_new_sqlite_log_both_open_it(tmp_path):
    """Router replicas starting together on one new SQLite file: the schema and its
    migrations are applied under the write lock, so neither dies on a column the other just
    added ("duplicate column name")."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    paths = [str(tmp_path / f"log{i}.sqlite") for i in range(40)]
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_open_logs, args=(paths, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
