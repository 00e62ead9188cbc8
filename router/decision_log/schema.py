"""The decision log's tables: ``decisions`` (one :class:`DecisionRow` per request), the
columns added since the first release (:data:`MIGRATIONS`, added to an older log when it is
opened), ``feedback`` and ``labels``. Written in SQLite's dialect; the PostgreSQL store
translates it (:func:`router.decision_log.stores.pg`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
              "artifact": "ALTER TABLE decisions ADD COLUMN artifact TEXT",
              # a follow-up turn (router/conversations.py): JSON {earlier, tokens, picked,
              # gain, handoff_cost, outcome}; NULL for a first turn
              "conversation": "ALTER TABLE decisions ADD COLUMN conversation TEXT",
              # the conversation with this turn's answer, hashed: the next turn finds it
              "turn_key": "ALTER TABLE decisions ADD COLUMN turn_key TEXT"}
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
# the learning loop's history (router/learning/auto.py): one row per step, from every
# replica; created in an older log when it is opened, as MIGRATIONS' columns are
LEARNING_SCHEMA = """
CREATE TABLE IF NOT EXISTS learning_events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,            -- unix seconds
    profile TEXT NOT NULL,         -- the learning profile
    event TEXT NOT NULL,           -- retrain_started | promoted | refused | failed | skipped |
                                   -- rolled_back | reloaded | reload_failed
    replica TEXT,                  -- host:pid of the router that wrote it
    labels INTEGER,                -- scored references in the log when the retrain started
    live TEXT,                     -- the serving artifact (sha256, 12 hex digits)
    candidate TEXT,                -- the candidate's (or, for a reload, the new live one's)
    path TEXT,                     -- the candidate's folder (what a reload loads)
    live_path TEXT,                -- the serving artifact's folder
    serving REAL,                  -- the gate: DR estimates on held-back requests (minus
    candidate_value REAL,          -- nats/token), their difference and its CI
    difference REAL,
    ci_low REAL,
    ci_high REAL,
    held_back INTEGER,             -- held-back labelled requests the gate used
    seconds REAL,                  -- how long the step took
    reason TEXT
)"""
INDEXES = ("CREATE INDEX IF NOT EXISTS decisions_request_id ON decisions (request_id)",
           "CREATE INDEX IF NOT EXISTS decisions_time ON decisions (time)",
           "CREATE INDEX IF NOT EXISTS decisions_turn_key ON decisions (turn_key)")


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
    conversation: dict | None = None  # a follow-up turn's decision (router/conversations.py)
    turn_key: str | None = None  # the conversation with this turn's answer, hashed
    time: float = field(default_factory=time.time)
