"""Committed decision-log rows survive the process being killed."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from router.decision_log import DecisionLog, DecisionRow

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
