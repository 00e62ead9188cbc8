"""The decision log: one row per request, written by one background thread; beside it the
outcomes clients report (``feedback``: a reward per response; ``labels``: a reference answer
scored under both backends), and a retention period.

Two stores, one schema. A path is a SQLite file; a ``postgresql://`` URL is a PostgreSQL
database (``psycopg``, the ``postgres`` extra, imported only then), which several router
replicas can share: feedback for a response one replica served is accepted by any other.

- :mod:`router.decision_log.schema`: the tables, :data:`MIGRATIONS`, :class:`DecisionRow`
- :mod:`router.decision_log.stores`: SQLite and PostgreSQL, :func:`read_log`
- :mod:`router.decision_log.writer`: the writer thread, its buffer during an outage, retention
- :mod:`router.decision_log.outcomes`: :class:`DecisionLog`, the feedback and labels API
"""

from router.decision_log.outcomes import DecisionLog
from router.decision_log.schema import MIGRATIONS, SCHEMA, DecisionRow
from router.decision_log.stores import (
    DecisionLogUnavailable,
    is_postgres,
    read_learning_events,
    read_log,
    redact_url,
)
from router.decision_log.writer import MAX_BUFFERED_ROWS, RETENTION_INTERVAL_S

__all__ = ["MAX_BUFFERED_ROWS", "MIGRATIONS", "RETENTION_INTERVAL_S", "SCHEMA", "DecisionLog",
           "DecisionLogUnavailable", "DecisionRow", "is_postgres", "read_learning_events",
           "read_log", "redact_url"]
