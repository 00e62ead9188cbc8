"""The decision log's feedback and labels API: the decision a response id was served with,
rewards and references stored beside it, synchronously (each call commits before it returns;
call them from a worker thread), and what is stored for a response."""

from __future__ import annotations

import math
import time

from router.decision_log.stores import LEARNING_EVENTS_SQL, DecisionLogUnavailable
from router.decision_log.writer import DecisionWriter


class DecisionLog(DecisionWriter):
    """The decision log: rows written in the background (:class:`DecisionWriter`), feedback
    and labels read and written synchronously."""

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
                self.hurry()  # don't wait out the batch window
            self._committed.wait_for(lambda: request_id not in self._pending or self.outage,
                                     wait_s)
        row = self.lookup(request_id)
        if row is None and wait_s > 0:
            time.sleep(4 * self.batch_window_s)
            row = self.lookup(request_id)
        return row

    def answered_turn(self, turn_key: str) -> dict | None:
        """The served turn whose conversation ends with its answer has this ``turn_key``
        (:mod:`router.conversations`), any replica's, as committed now: ``backend``,
        ``prompt_tokens``, ``completion_tokens``; None when none."""
        rows = self._query("SELECT backend, prompt_tokens, completion_tokens FROM decisions "
                           "WHERE turn_key = ? AND backend IS NOT NULL ORDER BY id DESC "
                           "LIMIT 1", (turn_key,))
        return rows[0] if rows else None

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

    # --- the learning loop's history (router/learning/auto.py) --------------------------
    def label_count(self) -> int:
        """Scored references in the log (every replica's)."""
        rows = self._query("SELECT COUNT(*) AS n FROM labels WHERE status = 'done'")
        return int(rows[0]["n"])

    def add_learning_event(self, event: dict) -> None:
        """One step of the learning loop, committed when this returns (keys: the columns of
        ``learning_events``; others are refused)."""
        cols = list(event)
        with self._tx() as cur:
            cur.execute(self.sql(f"INSERT INTO learning_events ({', '.join(cols)}) VALUES "
                                 f"({', '.join('?' for _ in cols)})"),
                        tuple(event[c] for c in cols))

    def learning_events(self, after_id: int = 0) -> list[dict]:
        """The learning loop's history after event ``after_id``, oldest first."""
        return self._query(LEARNING_EVENTS_SQL, (after_id,))
