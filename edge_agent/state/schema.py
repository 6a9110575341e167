"""The state database's schema and its history: the only module that knows them.

:data:`DDL` is today's schema (:data:`SCHEMA_VERSION`); :data:`MIGRATIONS` take a database
of an older version up to it, one version at a time, in the transaction that opens it.
Readers that must also read a database an older agent wrote, without changing it
(``edge-agent status``, ``/metrics``), ask :class:`Layout` what that database has instead of
knowing which version added what.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..histogram import FINE_BINS
from . import tallies

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 7

DDL = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'duplicate', 'rejected', 'skipped')),
    reason TEXT,
    sop_instance_uid TEXT,
    study_instance_uid TEXT,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    modality TEXT NOT NULL,
    accession_number TEXT,
    state TEXT NOT NULL CHECK (state IN ('open', 'complete', 'scored')),
    revision INTEGER NOT NULL DEFAULT 1,
    first_instance_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    complete_at REAL,
    triage TEXT
);
CREATE INDEX IF NOT EXISTS studies_state ON studies (state, last_instance_at);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL REFERENCES studies (study_instance_uid),
    series_instance_uid TEXT,
    path TEXT NOT NULL,
    modality TEXT NOT NULL,
    view TEXT NOT NULL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'scored', 'rejected', 'unused')),
    reason TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS results (
    alert_id TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    triage TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    published_at REAL,
    pacs_stored_at REAL
);
CREATE INDEX IF NOT EXISTS results_study ON results (study_instance_uid, revision);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL DEFAULT 1,
    alert_id TEXT,
    created_at REAL NOT NULL,
    triage TEXT,
    set_aside_at REAL,
    set_aside_reason TEXT
);
CREATE INDEX IF NOT EXISTS outbox_topic ON outbox (topic, id);
CREATE INDEX IF NOT EXISTS outbox_alert ON outbox (alert_id);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    topic TEXT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('pending', 'acknowledged', 'superseded', 'unacknowledged')),
    notify_count INTEGER NOT NULL DEFAULT 1,
    last_notified_at REAL,
    acked_by TEXT,
    acked_at TEXT,
    created_at REAL NOT NULL,
    carried_from TEXT,
    ack_taken_at REAL
);
CREATE INDEX IF NOT EXISTS alerts_study ON alerts (study_instance_uid, revision);
CREATE TABLE IF NOT EXISTS narratives (
    alert_id TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    source TEXT NOT NULL,
    deadline REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pacs_outbox (
    alert_id TEXT PRIMARY KEY REFERENCES results (alert_id),
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS pacs_outbox_due ON pacs_outbox (next_attempt_at);
CREATE TABLE IF NOT EXISTS tally_levels (
    day TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    triage TEXT NOT NULL CHECK (triage IN ('urgent', 'review', 'routine', 'not_scored')),
    studies INTEGER NOT NULL,
    PRIMARY KEY (day, model_sha256, triage)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tally_findings (
    day TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    finding TEXT NOT NULL,
    studies INTEGER NOT NULL,
    flagged INTEGER NOT NULL,
    urgent INTEGER NOT NULL,
    score_sum REAL NOT NULL,
    PRIMARY KEY (day, model_sha256, finding)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tally_bins (
    day TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    finding TEXT NOT NULL,
    bin INTEGER NOT NULL CHECK (bin >= 0 AND bin < {FINE_BINS}),
    studies INTEGER NOT NULL,
    PRIMARY KEY (day, model_sha256, finding, bin)
) WITHOUT ROWID;
"""
"""Today's schema. A table added by a version is created here (``IF NOT EXISTS``) when an
older database is opened; a column added to an existing table comes from its migration.
:func:`create` runs it statement by statement in one transaction: no ``;`` inside one."""

Migration = str | Callable[[sqlite3.Connection], object]
"""One step of a migration: an SQL statement, or a function run on the connection (in the
same transaction) for what SQL alone cannot do."""

MIGRATIONS: dict[int, tuple[Migration, ...]] = {
    # 1 -> 2: outbox messages carry their triage level (the cap policy needs it).
    1: (
        "ALTER TABLE outbox ADD COLUMN triage TEXT",
        "UPDATE outbox SET triage = (SELECT triage FROM results "
        "WHERE results.alert_id = outbox.alert_id) WHERE kind = 'result'",
    ),
    # 2 -> 3: draft narratives (the narratives table) and the alert a narrative revision
    # carries on (an ack of either stops both).
    # (An alerts table that did not exist before was created with the column.)
    2: ("ALTER TABLE alerts ADD COLUMN carried_from TEXT",),
    # 3 -> 4: messages set aside by the publisher (when and why); NULL: not set aside.
    3: (
        "ALTER TABLE outbox ADD COLUMN set_aside_at REAL",
        "ALTER TABLE outbox ADD COLUMN set_aside_reason TEXT",
    ),
    # 4 -> 5: the PACS destination (the pacs_outbox table, created by DDL): nothing else
    # changes; results stored before it are not sent to the PACS.
    4: (),
    # 5 -> 6: when the broker first acknowledged a result (PUBACK) and when the agent took
    # an alert's acknowledgement, by the agent's clock (time to notification and to
    # acknowledgement, `edge-export evaluate --state`), NULL for what happened before; and
    # the daily tallies of results (tally_* tables, created by DDL), filled from the results
    # stored so far: each study's first result, on its UTC day.
    5: (
        "ALTER TABLE results ADD COLUMN published_at REAL",
        "ALTER TABLE alerts ADD COLUMN ack_taken_at REAL",
        tallies.backfill,
    ),
    # 6 -> 7: when the PACS first answered Success to the result's SR (time to PACS,
    # `edge-export evaluate --state`), by the agent's clock; NULL for a result not sent to
    # the PACS, not stored yet, or stored before.
    6: ("ALTER TABLE results ADD COLUMN pacs_stored_at REAL",),
}
"""Version n -> n + 1: the statements that make a database of version n one of n + 1."""


def schema_problem(path: Path, found: object) -> ConfigError | None:
    """Why a database of schema ``found`` (meta.schema_version) cannot be used by this agent."""
    try:
        version = int(str(found))
    except ValueError:
        version = -1
    if version == SCHEMA_VERSION or (0 < version < SCHEMA_VERSION and version in MIGRATIONS):
        return None
    what = (
        f"was written by a newer edge-agent (schema {version}; this one reads up to "
        f"{SCHEMA_VERSION}): run that version again"
        if version > SCHEMA_VERSION
        else f"has an unknown schema version {str(found)[:20]!r}: run the edge-agent that wrote it"
    )
    return ConfigError(
        "state_dir",
        f"the state database {path} {what}, or set state_dir to "
        "another folder (the agent then starts with an empty state)",
    )


def create(conn: sqlite3.Connection, path: Path) -> None:
    """Create today's tables, then migrate an older database's (``conn`` in a transaction:
    the version written is the schema's, or the database stays as it was)."""
    for statement in DDL.split(";"):
        if statement.strip():
            conn.execute(statement)
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = SCHEMA_VERSION if row is None else int(row[0])
    problem = None if row is None else schema_problem(path, row[0])
    if problem is not None:
        raise problem
    while version < SCHEMA_VERSION:
        for step in MIGRATIONS[version]:
            if callable(step):
                step(conn)
            elif not _column_exists(conn, step):
                conn.execute(step)
        version += 1
        logger.info("state database %s migrated to schema %d", path, version)
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )


def _column_exists(conn: sqlite3.Connection, sql: str) -> bool:
    """True for an ``ALTER TABLE t ADD COLUMN c`` whose column is there already."""
    words = sql.split()
    if words[:2] != ["ALTER", "TABLE"] or words[3:5] != ["ADD", "COLUMN"]:
        return False
    return any(row[1] == words[5] for row in conn.execute(f"PRAGMA table_info({words[2]})"))


@dataclass(frozen=True)
class Layout:
    """The tables and columns a database has (one written by this agent or an older one)."""

    columns: dict[str, frozenset[str]]

    @classmethod
    def of(cls, conn: sqlite3.Connection) -> Layout:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = "SELECT name FROM pragma_table_info(?)"  # a name is data, never SQL
        return cls({t: frozenset(r[0] for r in conn.execute(columns, (t,))) for t in tables})

    def has(self, table: str, column: str | None = None) -> bool:
        return table in self.columns and (column is None or column in self.columns[table])

    def column(self, table: str, column: str) -> str:
        """``column``, or ``NULL`` where the database's schema predates it (an expression to
        put in a query in its place)."""
        return column if self.has(table, column) else "NULL"
