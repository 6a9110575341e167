"""Durable state in SQLite (WAL, fsync on every commit): the only module that writes state.

Tables: ``files`` (every path read from the watch folder and what became of it),
``instances``, ``studies``, ``results`` and ``outbox`` (messages not yet acknowledged by the
broker). Each step of the road commits in one transaction, so a crash at any moment leaves
either the state before the step or after it:

* an instance is recorded together with its file and its study's quiet timer;
* a reject is recorded together with its ``P/rejected`` message;
* a result is recorded together with its outbox message and the study's new state;
* an outbox message leaves only when the broker has acknowledged it (PUBACK), or when the
  outbox is full and the message is a droppable one (below).

The outbox keeps per-study order: the publisher is only ever given the oldest message of a
study topic, so revision n is acknowledged before revision n+1 (or a re-notification) is
handed to the broker. A message the publisher *sets aside* (the broker refused it, or it
broke the connection, ``mqtt.max_attempts`` times; or its topic can never be published)
stays in the outbox, marked with when and why, and is tried again later; it is not offered
with the others and no longer counts as its study topic's oldest message. The choice: the
study's later revisions and re-notifications go on rather than wait for ever behind a
message that may never go; when the set-aside one goes through on a later try it arrives
after them, so a receiver keeps the highest ``revision`` of a study (it dedups on
``alert_id`` anyway). Holding them back instead would make one bad message silence every
later result of its study, urgent ones included.

The outbox is capped at ``outbox_max_messages``: when full, the oldest
``routine`` and ``not_scored`` results and rejected-file messages are dropped first, then
``review`` results; ``urgent`` results and their re-notifications are never dropped (the
outbox then grows past its cap). Each drop is logged and counted.

``alerts`` holds the state of every urgent result: delivered when, notified how often,
acknowledged by whom. Re-notifications are queued from it into the outbox in one
transaction, so a crash loses neither the schedule nor a re-notification.

Each thread gets its own connection. Times are Unix seconds (``time.time()``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from .errors import ConfigError, CorruptState, EdgeTriageError, ResourceMissing
from .fsutil import fsync_dir
from .results import StudyResult
from .results import alert_id as _alert_id

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 4
OUTBOX_NEAR_CAP = 0.8
"""Depth, as a fraction of ``outbox_max_messages``, from which status and log say "near cap"."""

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
    carried_from TEXT
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
"""

_MIGRATIONS = {
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
}


def _column_exists(conn: sqlite3.Connection, sql: str) -> bool:
    """True for an ``ALTER TABLE t ADD COLUMN c`` whose column is there already."""
    words = sql.split()
    if words[:2] != ["ALTER", "TABLE"] or words[3:5] != ["ADD", "COLUMN"]:
        return False
    return any(row[1] == words[5] for row in conn.execute(f"PRAGMA table_info({words[2]})"))


# -- opening: the state folder and the database's integrity --------------------------------

_ERROR_NAMES = {
    "database disk image is malformed": "SQLITE_CORRUPT",
    "file is not a database": "SQLITE_NOTADB",
    "attempt to write a readonly database": "SQLITE_READONLY",
    "unable to open database file": "SQLITE_CANTOPEN",
    "database or disk is full": "SQLITE_FULL",
    "database is locked": "SQLITE_BUSY",
    "disk I/O error": "SQLITE_IOERR",
}


def _error_name(exc: sqlite3.Error) -> str:
    """SQLite's primary result code name (``SQLITE_CORRUPT``); Python < 3.11 from the text."""
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(name, str):
        return "_".join(name.split("_")[:2])  # SQLITE_IOERR_WRITE -> SQLITE_IOERR
    return next((v for k, v in _ERROR_NAMES.items() if str(exc).startswith(k)), "")


def state_error(exc: sqlite3.Error, path: Path) -> EdgeTriageError | None:
    """What a failure to open or write the state database at ``path`` means for an operator;
    None for a failure that is not about the database file, its folder or its disk."""
    name = _error_name(exc)
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return CorruptState(path, str(exc))
    if name in ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM"):
        return ConfigError(
            "state_dir",
            f"cannot write the state database {path} ({exc}): give the folder and its "
            "state.sqlite3* files to the agent's user, or set state_dir to a folder it can write",
        )
    if name == "SQLITE_FULL":
        return ResourceMissing(f"state_dir: the disk holding {path} is full: free some space")
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return ResourceMissing(
            f"state_dir: the state database {path} is locked by another process (another "
            "edge-agent with the same state_dir?): stop it, or give each agent its own state_dir"
        )
    if name == "SQLITE_IOERR":
        return ResourceMissing(f"state_dir: {path}: disk I/O error: check the disk (dmesg)")
    return None


def state_dir_problem(folder: Path) -> ConfigError | None:
    """Why ``folder`` cannot hold the agent's state (None: it can). Changes nothing."""
    if folder.exists() and not folder.is_dir():
        return ConfigError(
            "state_dir", f"{folder} is a file, not a folder: set state_dir to a folder"
        )
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return ConfigError(
            "state_dir", f"{existing} is a file, so {folder} cannot be created: fix state_dir"
        )
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return ConfigError(
            "state_dir",
            f"{folder} is on a read-only filesystem: set state_dir to a folder on a writable "
            "disk (under systemd: inside StateDirectory= or a ReadWritePaths= folder)",
        )
    names = [folder / f"state.sqlite3{end}" for end in ("", "-wal", "-shm")]
    for path in [existing, *(p for p in names if p.exists())]:
        if not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            return ConfigError(
                "state_dir",
                f"{path} is not writable by this user: give it to the agent's user (e.g. "
                "chown -R edge-agent: on the folder) or set state_dir to a folder it can write",
            )
    return None


def schema_problem(path: Path, found: object) -> ConfigError | None:
    """Why a database of schema ``found`` (meta.schema_version) cannot be used by this agent."""
    try:
        version = int(str(found))
    except ValueError:
        version = -1
    if version == SCHEMA_VERSION or (0 < version < SCHEMA_VERSION and version in _MIGRATIONS):
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


def inspect_database(path: Path) -> str | None:
    """Read ``path`` without changing anything: ``PRAGMA quick_check`` and the schema version.

    Returns the schema version found (None: a new or empty database); raises CorruptState
    when the file is damaged, ConfigError when this agent cannot use its schema, and the
    ConfigError/ResourceMissing of :func:`state_error` when it cannot be read.
    """
    if not path.exists():
        return None
    # Without a -wal file the database is complete in its main file: immutable=1 reads it
    # without creating -wal/-shm files (which, made by root running `check`, the agent's
    # user could not write). With one, a plain read-only connection reads it and the WAL.
    wal = path.with_name(path.name + "-wal").exists()
    uri = f"{path.absolute().as_uri()}?{'mode=ro' if wal else 'immutable=1'}"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0)
        try:
            rows = conn.execute("PRAGMA quick_check(5)").fetchall()
            if rows != [("ok",)]:
                raise CorruptState(path, "; ".join(str(r[0]) for r in rows)[:300])
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            row = (
                conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if "meta" in tables
                else None
            )
        finally:
            conn.close()
    except sqlite3.Error as exc:
        err = state_error(exc, path)
        if err is None:
            raise
        raise err from exc
    if row is None:
        return None
    problem = schema_problem(path, row[0])
    if problem is not None:
        raise problem
    return str(row[0])


def set_aside(path: Path, now: float | None = None) -> Path:
    """Rename a damaged ``path`` and its -wal/-shm to ``<name>.corrupt-<UTC time>`` (never
    deleted, never written to); returns the new name of the database file."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    for end in ("-wal", "-shm", ""):  # the main file last: a crash between leaves it found
        old = path.with_name(path.name + end)
        if old.exists():
            os.rename(old, target.with_name(target.name + end))
    fsync_dir(path.parent)  # the renames survive a power cut
    return target


# What the cap drops, in this order (oldest first within each class); never urgent.
_DROP_CLASSES = (
    "kind = 'rejected' OR triage IN ('routine', 'not_scored')",
    "triage = 'review'",
)

FileStatus = Literal["accepted", "duplicate", "rejected", "skipped"]
AckOutcome = Literal["acknowledged", "already acknowledged", "superseded", "not an urgent alert"]
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


class NarrativeJob(NamedTuple):
    """A draft narrative to write for the urgent result ``alert_id``."""

    alert_id: str
    study_instance_uid: str
    revision: int
    source: str
    """JSON: the image to describe (:class:`edge_agent.narrative.Source`)."""
    deadline: float
    """Unix time after which the narrative is published as 'timeout'."""


class Message(NamedTuple):
    """An outbox message to enqueue in the same transaction as the state it reports."""

    kind: Literal["result", "renotify", "rejected"]
    topic: str
    payload: bytes
    alert_id: str | None = None
    triage: str | None = None  # of a result; what the outbox cap may drop


def _drop_rank(msg: Message) -> int | None:
    """Index of ``msg``'s class in :data:`_DROP_CLASSES`; None: never dropped."""
    if msg.kind == "rejected" or msg.triage in ("routine", "not_scored"):
        return 0
    return 1 if msg.triage == "review" else None


class Store:
    """Thread-safe access to the state database (one connection per thread)."""

    def __init__(self, path: Path, *, outbox_max_messages: int = 10000) -> None:
        """Open (or create) the state database at ``path``.

        Raises ConfigError ``state_dir`` when the folder cannot hold it (a file, read-only,
        not writable) or its schema is unknown, CorruptState when the file is damaged (it is
        left as it is: :func:`open_state` sets it aside), ResourceMissing when its disk is
        full or another process holds it.
        """
        self.path = path
        self.outbox_max_messages = outbox_max_messages
        problem = state_dir_problem(path.parent)
        if problem is not None:
            raise problem
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("state_dir", f"cannot create {path.parent}: {exc.strerror}") from exc
        inspect_database(path)  # read-only: a damaged file is never written to
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._near_cap = False
        self._over_cap_logged = False
        try:
            self._create()
        except sqlite3.Error as exc:
            self.close()
            err = state_error(exc, path)
            if err is None:
                raise
            raise err from exc
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        path = self.path
        conn = self._conn()
        conn.executescript(_SCHEMA)
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = SCHEMA_VERSION if row is None else int(row[0])
            problem = None if row is None else schema_problem(path, row[0])
            if problem is not None:
                raise problem
            while version < SCHEMA_VERSION:
                for sql in _MIGRATIONS[version]:
                    if not _column_exists(c, sql):
                        c.execute(sql)
                version += 1
                logger.info("state database %s migrated to schema %d", path, version)
            c.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
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
    def _count(conn: sqlite3.Connection, name: str, by: int = 1) -> None:
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def _enqueue(self, conn: sqlite3.Connection, msg: Message, now: float) -> None:
        """Queue ``msg``; when the outbox is full, first drop what the cap policy allows.

        The new message is the newest of its class: it is dropped itself only when nothing
        older of its class, or of a class dropped before it, is left.
        """
        cap = self.outbox_max_messages
        depth = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
        need = depth + 1 - cap  # messages to drop so that the new one fits
        for rank, where in enumerate(_DROP_CLASSES):
            if need <= 0:
                break
            victims = conn.execute(
                f"SELECT id, kind, topic, alert_id, triage FROM outbox WHERE {where} "
                "ORDER BY id LIMIT ?",
                (need,),
            ).fetchall()
            for victim_id, kind, topic, alert, triage in victims:
                conn.execute("DELETE FROM outbox WHERE id = ?", (victim_id,))
                self._dropped(conn, kind, topic, alert, triage, f"oldest, outbox #{victim_id}")
            need -= len(victims)
            depth -= len(victims)
            if need > 0 and _drop_rank(msg) == rank:
                self._dropped(conn, msg.kind, msg.topic, msg.alert_id, msg.triage, "new")
                return
        if need > 0:
            if not self._over_cap_logged:
                logger.error(
                    "outbox over its cap (%d messages, cap %d) and only urgent results are "
                    "left: nothing dropped",
                    depth + 1,
                    cap,
                )
            self._over_cap_logged = True
        else:
            self._over_cap_logged = False
        conn.execute(
            "INSERT INTO outbox (kind, topic, payload, qos, alert_id, created_at, triage) "
            "VALUES (?, ?, ?, 1, ?, ?, ?)",
            (msg.kind, msg.topic, msg.payload, msg.alert_id, now, msg.triage),
        )
        self._note_depth(depth + 1)

    def _dropped(
        self,
        conn: sqlite3.Connection,
        kind: str,
        topic: str,
        alert: str | None,
        triage: str | None,
        which: str,
    ) -> None:
        self._count(conn, "outbox_dropped")
        if kind == "rejected":
            what = "rejected-file message"
        else:
            what = f"{triage} study result {topic.rsplit('/', 1)[-1]} (alert {alert})"
        logger.warning(
            "outbox full (cap %d): dropped the %s (%s)", self.outbox_max_messages, what, which
        )

    def _note_depth(self, depth: int) -> bool:
        """Log when the outbox crosses :data:`OUTBOX_NEAR_CAP` of its cap; True when near."""
        near = depth >= OUTBOX_NEAR_CAP * self.outbox_max_messages
        with self._lock:
            changed, self._near_cap = near != self._near_cap, near
        if changed and near:
            logger.warning(
                "outbox near its cap: %d messages of %d (%.0f%%); the oldest non-urgent "
                "messages are dropped when it is full",
                depth,
                self.outbox_max_messages,
                100 * depth / self.outbox_max_messages,
            )
        elif changed:
            logger.info(
                "outbox below %.0f%% of its cap again (%d messages of %d)",
                100 * OUTBOX_NEAR_CAP,
                depth,
                self.outbox_max_messages,
            )
        return near

    def secret(self, name: str) -> bytes:
        """A random 32-byte secret of this database, kept in ``meta`` under ``name`` and
        created on first use (the key of ``P/rejected``'s file ids)."""
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                (name, secrets.token_hex(32)),
            )
            (value,) = c.execute("SELECT value FROM meta WHERE key = ?", (name,)).fetchone()
        return bytes.fromhex(value)

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
        SOPInstanceUID seen again is recorded as a duplicate and changes nothing else, unless
        that instance was rejected when it was scored (e.g. read while a writer paused, its
        pixels cut short): then this file replaces it, it is pending again, and its study is
        re-opened (a new revision if it was scored), so the complete image gets its score.
        Seen again in the instance's own file (a C-STORE sent twice is written over the same
        ``<Study>/<SOP>.dcm``, a modality rewrites a file in place), the file stays
        'accepted': it is still that instance's file, not a copy of it.
        """
        with self._tx() as c:
            known = c.execute(
                "SELECT state, path FROM instances WHERE sop_instance_uid = ?",
                (inst.sop_instance_uid,),
            ).fetchone()
            replaces = known is not None and known[0] == "rejected"
            dup = known is not None and not replaces
            status: FileStatus = "duplicate" if dup and known[1] != path else "accepted"
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
                        "%s re-opens study %s as a new revision",
                        "a rejected instance read again" if replaces else "late instance",
                        inst.study_instance_uid,
                    )
            values = (
                inst.study_instance_uid,
                inst.series_instance_uid,
                path,
                inst.modality,
                inst.view,
                now,
                inst.sop_instance_uid,
            )
            if replaces:
                c.execute(
                    "UPDATE instances SET study_instance_uid = ?, series_instance_uid = ?, "
                    "path = ?, modality = ?, view = ?, received_at = ?, state = 'pending', "
                    "reason = NULL WHERE sop_instance_uid = ?",
                    values,
                )
            else:
                c.execute(
                    "INSERT INTO instances (study_instance_uid, series_instance_uid, path, "
                    "modality, view, received_at, sop_instance_uid) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    values,
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
        narrative: NarrativeJob | None = None,
    ) -> bool:
        """Store a study's result, its outbox message and its instances' fate, atomically;
        with ``narrative``, the job that will write the result's draft narrative, in the
        same transaction (a crash cannot lose it).

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
                self._supersede_alerts(c, study.study_instance_uid, study.revision)
                self._enqueue(c, result._replace(triage=triage), now)
                if triage == "urgent":
                    c.execute(
                        "INSERT INTO alerts (alert_id, study_instance_uid, revision, topic, "
                        "state, created_at) VALUES (?, ?, ?, ?, 'pending', ?)",
                        (
                            result.alert_id,
                            study.study_instance_uid,
                            study.revision,
                            result.topic,
                            now,
                        ),
                    )
                for msg in rejects:
                    self._enqueue(c, msg, now)
                if narrative is not None:
                    c.execute(
                        "INSERT OR IGNORE INTO narratives VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            result.alert_id,
                            study.study_instance_uid,
                            study.revision,
                            narrative.source,
                            narrative.deadline,
                            now,
                        ),
                    )
            return True

    # -- draft narratives -------------------------------------------------------------------

    def narrative_jobs(self) -> list[NarrativeJob]:
        """Narratives still to write, oldest first (those of a crash included)."""
        rows = self._conn().execute(
            "SELECT alert_id, study_instance_uid, revision, source, deadline FROM narratives "
            "ORDER BY created_at"
        )
        return [NarrativeJob(*row) for row in rows]

    def commit_narrative(
        self,
        job: NarrativeJob,
        topic: str,
        build: Callable[[StudyResult, int, str], StudyResult],
        now: float,
    ) -> int | None:
        """Publish a narrative's outcome as the study's next revision, atomically: the
        result, its outbox message, the study's new revision, and the urgent alert carried
        over (acknowledged stays acknowledged; notification goes on under the new alert id);
        the job is done.

        ``build(flag_result, revision, alert_id)`` makes the revision's result, published on
        ``topic``. Returns the
        new revision, or None when the study moved on (re-opened by a late instance, whose
        revision gets its own narrative): the job is then dropped.
        """
        with self._tx() as c:
            c.execute("DELETE FROM narratives WHERE alert_id = ?", (job.alert_id,))
            row = c.execute(
                "SELECT state, revision FROM studies WHERE study_instance_uid = ?",
                (job.study_instance_uid,),
            ).fetchone()
            flag = c.execute(
                "SELECT payload, triage FROM results WHERE alert_id = ?", (job.alert_id,)
            ).fetchone()
            if row != ("scored", job.revision) or flag is None:
                return None
            revision = job.revision + 1
            previous = StudyResult.model_validate_json(flag[0])
            result = build(
                previous,
                revision,
                _alert_id(job.study_instance_uid, revision, previous.model.sha256),
            )
            msg = Message("result", topic, result.to_json_bytes(), result.alert_id)
            c.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                (msg.alert_id, job.study_instance_uid, revision, flag[1], msg.payload, now),
            )
            c.execute(
                "UPDATE studies SET revision = ? WHERE study_instance_uid = ?",
                (revision, job.study_instance_uid),
            )
            alert = c.execute(
                "SELECT state, notify_count, last_notified_at, acked_by, acked_at FROM alerts "
                "WHERE alert_id = ?",
                (job.alert_id,),
            ).fetchone()
            self._enqueue(c, msg._replace(triage=flag[1]), now)
            self._count(c, f"narrative_{result.narrative_status}")
            if alert is not None:
                state = alert[0] if alert[0] != "superseded" else "pending"
                c.execute(
                    "INSERT OR REPLACE INTO alerts (alert_id, study_instance_uid, revision, "
                    "topic, state, notify_count, last_notified_at, acked_by, acked_at, "
                    "created_at, carried_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        msg.alert_id,
                        job.study_instance_uid,
                        revision,
                        msg.topic,
                        state,
                        alert[1],
                        alert[2],
                        alert[3],
                        alert[4],
                        now,
                        job.alert_id,
                    ),
                )
                if alert[0] in ("pending", "unacknowledged"):
                    c.execute(
                        "UPDATE alerts SET state = 'superseded' WHERE alert_id = ?",
                        (job.alert_id,),
                    )
                    c.execute(
                        "DELETE FROM outbox WHERE kind = 'renotify' AND alert_id = ?",
                        (job.alert_id,),
                    )
            return revision

    @staticmethod
    def _supersede_alerts(conn: sqlite3.Connection, study_instance_uid: str, revision: int) -> None:
        """A newer revision's result replaces the re-notification of older urgent ones."""
        older = [
            r[0]
            for r in conn.execute(
                "SELECT alert_id FROM alerts WHERE study_instance_uid = ? AND revision < ? "
                "AND state IN ('pending', 'unacknowledged')",
                (study_instance_uid, revision),
            )
        ]
        for alert in older:
            conn.execute("UPDATE alerts SET state = 'superseded' WHERE alert_id = ?", (alert,))
            conn.execute("DELETE FROM outbox WHERE kind = 'renotify' AND alert_id = ?", (alert,))
            logger.info(
                "urgent alert %s of study %s superseded by revision %d: not re-notified any more",
                alert,
                study_instance_uid,
                revision,
            )

    # -- alerts: acknowledgement and re-notification ----------------------------------------

    def acknowledge(
        self, study_instance_uid: str, alert_id: str, by: str | None, at: str | None
    ) -> AckOutcome:
        """Record a dashboard's ack of ``alert_id``; it stops that alert's re-notification
        (and drops a queued one). An ack names one alert: an older revision's alert_id does
        not silence a newer one, except the revision that only adds the alert's draft
        narrative (same findings), which the ack of either silences."""
        with self._tx() as c:
            row = c.execute(
                "SELECT state FROM alerts WHERE alert_id = ? AND study_instance_uid = ?",
                (alert_id, study_instance_uid),
            ).fetchone()
            if row is None:
                return "not an urgent alert"
            if row[0] == "acknowledged":
                return "already acknowledged"
            c.execute(
                "UPDATE alerts SET acked_by = ?, acked_at = ? WHERE alert_id = ?",
                (by, at, alert_id),
            )
            # A narrative revision carries the flag's alert on under a new alert id (and is
            # never narrated itself): an ack of either acknowledges both (the dashboard may
            # ack the flag while its narrative is on the way).
            live = [
                r[0]
                for r in c.execute(
                    "SELECT alert_id FROM alerts WHERE state IN ('pending', 'unacknowledged') "
                    "AND (alert_id = :a OR carried_from = :a "
                    "OR alert_id = (SELECT carried_from FROM alerts WHERE alert_id = :a))",
                    {"a": alert_id},
                )
            ]
            if row[0] == "superseded" and not live:
                return "superseded"
            for a in live:
                c.execute(
                    "UPDATE alerts SET state = 'acknowledged', acked_by = ?, acked_at = ? "
                    "WHERE alert_id = ?",
                    (by, at, a),
                )
                c.execute("DELETE FROM outbox WHERE kind = 'renotify' AND alert_id = ?", (a,))
            self._count(c, "acknowledged")
            return "acknowledged"

    def enqueue_renotifications(self, now: float, every: float, limit: int) -> int:
        """Queue the urgent results due again: not acknowledged, last delivered at least
        ``every`` seconds ago, nothing of theirs in the outbox, fewer than ``limit``
        re-notifications so far. An alert past its limit is marked ``unacknowledged``
        (logged). Returns how many were queued."""
        queued = 0
        with self._tx() as c:
            due = c.execute(
                "SELECT a.alert_id, a.study_instance_uid, a.topic, a.notify_count, r.payload "
                "FROM alerts AS a JOIN results AS r ON r.alert_id = a.alert_id "
                "WHERE a.state = 'pending' AND a.last_notified_at <= ? "
                "AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.alert_id = a.alert_id) "
                "ORDER BY a.last_notified_at",
                (now - every,),
            ).fetchall()
            for alert, uid, topic, count, payload in due:
                if count > limit:
                    c.execute(
                        "UPDATE alerts SET state = 'unacknowledged' WHERE alert_id = ?", (alert,)
                    )
                    logger.warning(
                        "urgent alert %s of study %s not acknowledged after %d notifications; "
                        "not re-notified any more",
                        alert,
                        uid,
                        count,
                    )
                    continue
                again = StudyResult.model_validate_json(payload).renotification(count + 1)
                self._enqueue(
                    c, Message("renotify", topic, again.to_json_bytes(), alert, "urgent"), now
                )
                c.execute(
                    "UPDATE alerts SET notify_count = ? WHERE alert_id = ?", (count + 1, alert)
                )
                logger.info(
                    "urgent alert %s of study %s not acknowledged: notification %d queued",
                    alert,
                    uid,
                    count + 1,
                )
                queued += 1
        return queued

    def alert(self, alert_id: str) -> dict[str, object] | None:
        """An urgent alert's state (for status and tests)."""
        cur = self._conn().execute(
            "SELECT alert_id, study_instance_uid, revision, state, notify_count, "
            "last_notified_at, acked_by, acked_at FROM alerts WHERE alert_id = ?",
            (alert_id,),
        )
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None

    # -- outbox (edge_agent.mqtt.Outbox) ----------------------------------------------------

    def outbox_pending(self, limit: int, exclude: Collection[int]) -> list[OutboxMessage]:
        """The oldest messages not set aside, but of each study topic only its oldest such
        message: the next one is offered once that one has left (PUBACK) or been set
        aside, so a study's messages reach the broker in order. Rejected-file messages are
        not ordered."""
        excluded = set(exclude)
        rows = self._conn().execute(
            "SELECT id, topic, payload, qos FROM outbox AS o WHERE set_aside_at IS NULL "
            "AND (kind = 'rejected' OR id = (SELECT min(id) FROM outbox "
            "WHERE topic = o.topic AND set_aside_at IS NULL)) ORDER BY id LIMIT ?",
            (limit + len(excluded),),
        )
        out = [OutboxMessage(i, t, bytes(p), q) for i, t, p, q in rows if i not in excluded]
        return out[:limit]

    def outbox_delete(self, message_id: int) -> None:
        with self._tx() as c:
            row = c.execute(
                "SELECT kind, alert_id FROM outbox WHERE id = ?", (message_id,)
            ).fetchone()
            if row is None:
                return
            c.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
            self._count(c, f"published_{row[0]}")
            if row[1] is not None:  # an urgent alert's re-notification clock starts now
                c.execute(
                    "UPDATE alerts SET last_notified_at = ? WHERE alert_id = ? "
                    "AND state = 'pending'",
                    (time.time(), row[1]),
                )

    def outbox_set_aside(self, message_id: int, reason: str) -> bool:
        """Mark a message as set aside (it stays; see the module's docstring), with the
        time and ``reason``; counted in ``set_aside`` the first time. True when it was not
        set aside before; False also when it has left the outbox meanwhile."""
        with self._tx() as c:
            row = c.execute(
                "SELECT set_aside_at FROM outbox WHERE id = ?", (message_id,)
            ).fetchone()
            if row is None:
                return False
            c.execute(
                "UPDATE outbox SET set_aside_at = ?, set_aside_reason = ? WHERE id = ?",
                (time.time(), reason, message_id),
            )
            if row[0] is None:
                self._count(c, "set_aside")
            return row[0] is None

    def outbox_set_aside_messages(self) -> list[OutboxMessage]:
        """The messages set aside, oldest first (the publisher tries them again)."""
        rows = self._conn().execute(
            "SELECT id, topic, payload, qos FROM outbox WHERE set_aside_at IS NOT NULL ORDER BY id"
        )
        return [OutboxMessage(i, t, bytes(p), q) for i, t, p, q in rows]

    def note_delivery(self, last_error: str | None, counts: dict[str, int]) -> None:
        """Keep the publisher's figures where ``edge-agent status`` reads them: its latest
        delivery problem (``meta.mqtt_last_error``) and counts to add (ack counters)."""
        with self._tx() as c:
            if last_error is not None:
                c.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('mqtt_last_error', ?)",
                    (last_error,),
                )
            for name, by in counts.items():
                if by:
                    self._count(c, name, by)

    def outbox_messages(self) -> list[OutboxMessage]:
        """Every queued message, oldest first, whether or not it is offered yet (for
        inspection; the publisher uses :meth:`outbox_pending`)."""
        rows = self._conn().execute("SELECT id, topic, payload, qos FROM outbox ORDER BY id")
        return [OutboxMessage(i, t, bytes(p), q) for i, t, p, q in rows]

    def outbox_depth(self) -> int:
        return int(self._conn().execute("SELECT count(*) FROM outbox").fetchone()[0])

    # -- reporting --------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        c = self._conn()

        def one(sql: str) -> int:
            return int(c.execute(sql).fetchone()[0])

        stored = dict(c.execute("SELECT name, value FROM counters").fetchall())
        depth = one("SELECT count(*) FROM outbox")
        return {
            "studies_seen": one("SELECT count(*) FROM studies"),
            "studies_open": one("SELECT count(*) FROM studies WHERE state != 'scored'"),
            "studies_scored": one("SELECT count(*) FROM studies WHERE state = 'scored'"),
            "results": one("SELECT count(*) FROM results"),
            "published": int(stored.get("published_result", 0)),
            "instances": one("SELECT count(*) FROM instances"),
            "rejected": one("SELECT count(*) FROM files WHERE status = 'rejected'"),
            "skipped": one("SELECT count(*) FROM files WHERE status = 'skipped'"),
            "outbox_depth": depth,
            "outbox_max_messages": self.outbox_max_messages,
            "outbox_near_cap": self._note_depth(depth),
            "outbox_dropped": int(stored.get("outbox_dropped", 0)),
            "outbox_set_aside": one("SELECT count(*) FROM outbox WHERE set_aside_at IS NOT NULL"),
            "urgent_unacknowledged": one(
                "SELECT count(*) FROM alerts WHERE state IN ('pending', 'unacknowledged')"
            ),
            "renotified": int(stored.get("published_renotify", 0)),
            "acknowledged": int(stored.get("acknowledged", 0)),
            "acks_received": int(stored.get("acks_received", 0)),
            "acks_unknown": int(stored.get("acks_unknown", 0)),
            "acks_refused": int(stored.get("acks_refused", 0)),
            "narratives_pending": one("SELECT count(*) FROM narratives"),
            "narratives_written": int(stored.get("narrative_ok", 0)),
            "narratives_timeout": int(stored.get("narrative_timeout", 0)),
            "narratives_failed": int(stored.get("narrative_failed", 0)),
        }


def open_state(path: Path, *, outbox_max_messages: int = 10000) -> tuple[Store, Path | None]:
    """The agent's store at ``path``; a damaged database is set aside first (never deleted)
    and the agent starts with an empty one. Returns the store and where the damaged file went.

    Keeping on triaging matters more, beside a scanner, than what the old file held: its
    results that were not delivered yet stay in it for an operator (``sqlite3 FILE .recover``).
    """
    try:
        return Store(path, outbox_max_messages=outbox_max_messages), None
    except CorruptState as exc:
        aside = set_aside(path)
        logger.error(
            "state database %s is damaged (%s): moved to %s and starting with an empty state. "
            "Results not yet delivered are in that file; to look: sqlite3 %s .recover",
            path,
            exc.detail,
            aside,
            aside,
        )
        return Store(path, outbox_max_messages=outbox_max_messages), aside
