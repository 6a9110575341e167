"""Durable state in SQLite (WAL, fsync on every commit): the only module that writes state.

Tables: ``files`` (every path read from the watch folder and what became of it),
``instances``, ``studies``, ``results`` and ``outbox`` (messages not yet acknowledged by the
broker). Each step of the road commits in one transaction, so a crash at any moment leaves
either the state before the step or after it:

* an instance is recorded together with its file and its study's quiet timer;
* a reject is recorded together with its ``P/rejected`` message;
* a result is recorded together with its outbox message and the study's new state;
* an outbox message leaves only when the broker has acknowledged it (PUBACK).

Each thread gets its own connection. Times are Unix seconds (``time.time()``).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
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
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_study ON results (study_instance_uid, revision);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL DEFAULT 1,
    alert_id TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

FileStatus = Literal["accepted", "duplicate", "rejected", "skipped"]
View = Literal["frontal", "lateral", "unknown", "other"]


class OutboxMessage(NamedTuple):
    id: int
    topic: str
    payload: bytes
    qos: int


@dataclass(frozen=True)
class InstanceRecord:
    """What intake learned from one file's header (no PHI)."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str | None
    modality: str
    view: View
    accession_number: str | None = None


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    modality: str
    accession_number: str | None
    state: str
    revision: int
    first_instance_at: float
    last_instance_at: float
    complete_at: float | None
    triage: str | None


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    series_instance_uid: str | None
    path: str
    modality: str
    view: str
    state: str
    reason: str | None


class Message(NamedTuple):
    """An outbox message to enqueue in the same transaction as the state it reports."""

    kind: Literal["result", "rejected"]
    topic: str
    payload: bytes
    alert_id: str | None = None


class Store:
    """Thread-safe access to the state database (one connection per thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        conn.executescript(_SCHEMA)
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"state database {path} has schema {row[0]}, this agent knows {SCHEMA_VERSION}"
                )

    # -- plumbing ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=30.0, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.ProgrammingError):
                    conn.close()  # may be closed already
            self._connections.clear()
        self._local = threading.local()

    @staticmethod
    def _enqueue(conn: sqlite3.Connection, msg: Message, now: float) -> None:
        conn.execute(
            "INSERT INTO outbox (kind, topic, payload, qos, alert_id, created_at) "
            "VALUES (?, ?, ?, 1, ?, ?)",
            (msg.kind, msg.topic, msg.payload, msg.alert_id, now),
        )

    # -- intake -----------------------------------------------------------------------------

    def file_signatures(self) -> dict[str, tuple[int, int]]:
        """Every path already handled, with the (size, mtime_ns) it had then."""
        rows = self._conn().execute("SELECT path, size, mtime_ns FROM files")
        return {path: (size, mtime) for path, size, mtime in rows}

    def add_instance(
        self, path: str, size: int, mtime_ns: int, inst: InstanceRecord, now: float
    ) -> FileStatus:
        """Record a readable instance and restart its study's quiet timer.

        A study that was already scored is re-opened as the next revision. The same
        SOPInstanceUID seen again is recorded as a duplicate and changes nothing else.
        """
        with self._tx() as c:
            dup = c.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (inst.sop_instance_uid,)
            ).fetchone()
            status: FileStatus = "duplicate" if dup else "accepted"
            c.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, NULL, ?, ?, ?)",
                (path, size, mtime_ns, status, inst.sop_instance_uid, inst.study_instance_uid, now),
            )
            if dup:
                return status
            study = c.execute(
                "SELECT state FROM studies WHERE study_instance_uid = ?",
                (inst.study_instance_uid,),
            ).fetchone()
            if study is None:
                c.execute(
                    "INSERT INTO studies (study_instance_uid, modality, accession_number, state, "
                    "revision, first_instance_at, last_instance_at) "
                    "VALUES (?, ?, ?, 'open', 1, ?, ?)",
                    (inst.study_instance_uid, inst.modality, inst.accession_number, now, now),
                )
            else:
                bump = 1 if study[0] == "scored" else 0
                c.execute(
                    "UPDATE studies SET state = 'open', revision = revision + ?, "
                    "last_instance_at = ?, complete_at = NULL WHERE study_instance_uid = ?",
                    (bump, now, inst.study_instance_uid),
                )
                if bump:
                    logger.info(
                        "late instance re-opens study %s as a new revision",
                        inst.study_instance_uid,
                    )
            c.execute(
                "INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid, "
                "path, modality, view, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    inst.sop_instance_uid,
                    inst.study_instance_uid,
                    inst.series_instance_uid,
                    path,
                    inst.modality,
                    inst.view,
                    now,
                ),
            )
            return status

    def record_file(
        self,
        path: str,
        size: int,
        mtime_ns: int,
        status: Literal["rejected", "skipped"],
        reason: str,
        now: float,
        *,
        sop_instance_uid: str | None = None,
        study_instance_uid: str | None = None,
        message: Message | None = None,
    ) -> None:
        """Record a file that will not be scored, and its ``P/rejected`` message if any."""
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (path, size, mtime_ns, status, reason, sop_instance_uid, study_instance_uid, now),
            )
            if message is not None:
                self._enqueue(c, message, now)

    # -- studies ----------------------------------------------------------------------------

    def complete_quiet_studies(self, quiet_seconds: float, now: float) -> list[str]:
        """Mark open studies without a new instance for ``quiet_seconds`` complete."""
        with self._tx() as c:
            rows = c.execute(
                "SELECT study_instance_uid FROM studies WHERE state = 'open' "
                "AND last_instance_at <= ? ORDER BY last_instance_at",
                (now - quiet_seconds,),
            ).fetchall()
            uids = [r[0] for r in rows]
            c.executemany(
                "UPDATE studies SET state = 'complete', complete_at = ? "
                "WHERE study_instance_uid = ?",
                [(now, uid) for uid in uids],
            )
        return uids

    def studies_in_state(self, state: str) -> list[str]:
        rows = self._conn().execute(
            "SELECT study_instance_uid FROM studies WHERE state = ? ORDER BY complete_at, "
            "last_instance_at",
            (state,),
        )
        return [r[0] for r in rows]

    def study(self, study_instance_uid: str) -> StudyRow | None:
        row = (
            self._conn()
            .execute(
                "SELECT study_instance_uid, modality, accession_number, state, revision, "
                "first_instance_at, last_instance_at, complete_at, triage FROM studies "
                "WHERE study_instance_uid = ?",
                (study_instance_uid,),
            )
            .fetchone()
        )
        return StudyRow(*row) if row else None

    def instances(self, study_instance_uid: str) -> list[InstanceRow]:
        rows = self._conn().execute(
            "SELECT sop_instance_uid, series_instance_uid, path, modality, view, state, reason "
            "FROM instances WHERE study_instance_uid = ? ORDER BY received_at, sop_instance_uid",
            (study_instance_uid,),
        )
        return [InstanceRow(*r) for r in rows]

    def rejected_count(self, study_instance_uid: str) -> int:
        row = (
            self._conn()
            .execute(
                "SELECT count(*) FROM files WHERE study_instance_uid = ? AND status = 'rejected'",
                (study_instance_uid,),
            )
            .fetchone()
        )
        return int(row[0])

    def commit_result(
        self,
        study: StudyRow,
        triage: str,
        result: Message,
        instance_states: dict[str, tuple[str, str | None]],
        rejects: Collection[Message],
        now: float,
    ) -> bool:
        """Store a study's result, its outbox message and its instances' fate, atomically.

        Returns False (and changes nothing) when the study changed while it was being
        scored: a new instance re-opened it, so it will be scored again once quiet.
        """
        assert result.alert_id is not None
        with self._tx() as c:
            row = c.execute(
                "SELECT state, revision, last_instance_at FROM studies "
                "WHERE study_instance_uid = ?",
                (study.study_instance_uid,),
            ).fetchone()
            if row != ("complete", study.revision, study.last_instance_at):
                return False
            inserted = c.execute(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                (
                    result.alert_id,
                    study.study_instance_uid,
                    study.revision,
                    triage,
                    result.payload,
                    now,
                ),
            ).rowcount
            c.execute(
                "UPDATE studies SET state = 'scored', triage = ? WHERE study_instance_uid = ?",
                (triage, study.study_instance_uid),
            )
            c.executemany(
                "UPDATE instances SET state = ?, reason = ? WHERE sop_instance_uid = ?",
                [(state, reason, uid) for uid, (state, reason) in instance_states.items()],
            )
            if inserted:
                self._enqueue(c, result, now)
                for msg in rejects:
                    self._enqueue(c, msg, now)
            return True

    # -- outbox (edge_agent.mqtt.Outbox) ----------------------------------------------------

    def outbox_pending(self, limit: int, exclude: Collection[int]) -> list[OutboxMessage]:
        excluded = set(exclude)
        rows = self._conn().execute(
            "SELECT id, topic, payload, qos FROM outbox ORDER BY id LIMIT ?",
            (limit + len(excluded),),
        )
        out = [OutboxMessage(i, t, bytes(p), q) for i, t, p, q in rows if i not in excluded]
        return out[:limit]

    def outbox_delete(self, message_id: int) -> None:
        with self._tx() as c:
            row = c.execute("SELECT kind FROM outbox WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                return
            c.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
            c.execute(
                "INSERT INTO counters (name, value) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET value = value + 1",
                (f"published_{row[0]}",),
            )

    def outbox_depth(self) -> int:
        return int(self._conn().execute("SELECT count(*) FROM outbox").fetchone()[0])

    # -- reporting --------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        c = self._conn()

        def one(sql: str) -> int:
            return int(c.execute(sql).fetchone()[0])

        stored = dict(c.execute("SELECT name, value FROM counters").fetchall())
        return {
            "studies_seen": one("SELECT count(*) FROM studies"),
            "studies_open": one("SELECT count(*) FROM studies WHERE state != 'scored'"),
            "results": one("SELECT count(*) FROM results"),
            "published": int(stored.get("published_result", 0)),
            "instances": one("SELECT count(*) FROM instances"),
            "rejected": one("SELECT count(*) FROM files WHERE status = 'rejected'"),
            "skipped": one("SELECT count(*) FROM files WHERE status = 'skipped'"),
            "outbox_depth": one("SELECT count(*) FROM outbox"),
        }
