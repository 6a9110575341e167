"""Durable state in SQLite (WAL, fsync on every commit): :class:`Store` is the only writer.

The Store owns the connections (one per thread) and the transactions; the SQL of each table
is in its module of :mod:`edge_agent.state` (:mod:`~edge_agent.state.schema` holds the
tables and their history, :mod:`~edge_agent.state.report` the figures status shows).

Tables: ``files`` (every path read from the watch folder and what became of it),
``instances``, ``studies``, ``results`` and ``outbox`` (messages not yet acknowledged by the
broker). Each step of the road commits in one transaction, so a crash at any moment leaves
either the state before the step or after it:

* an instance is recorded together with its file and its study's quiet timer;
* a reject is recorded together with its ``P/rejected`` message;
* a result is recorded together with its outbox message and the study's new state (and,
  a study's first, its count in the daily tallies ``tally_*``);
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
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from .errors import ConfigError, CorruptState
from .results import StudyResult
from .state import (
    alerts,
    files,
    meta,
    narratives,
    outbox,
    pacs,
    report,
    schema,
    studies,
    tallies,
)
from .state.alerts import AckOutcome
from .state.database import (
    connect,
    inspect_database,
    set_aside,
    state_dir_problem,
    state_error,
)
from .state.files import FileStatus
from .state.narratives import NarrativeJob
from .state.outbox import OUTBOX_NEAR_CAP, Message, OutboxCap, OutboxMessage
from .state.pacs import PacsRow
from .state.schema import SCHEMA_VERSION, schema_problem
from .state.studies import InstanceRecord, InstanceRow, StudyRow, View

__all__ = [
    "OUTBOX_NEAR_CAP",
    "SCHEMA_VERSION",
    "AckOutcome",
    "FileStatus",
    "InstanceRecord",
    "InstanceRow",
    "Message",
    "NarrativeJob",
    "OutboxMessage",
    "PacsRow",
    "Store",
    "StudyRow",
    "View",
    "inspect_database",
    "open_state",
    "schema_problem",
    "set_aside",
    "state_dir_problem",
    "state_error",
]

logger = logging.getLogger(__name__)


class Store:
    """Thread-safe access to the state database (one connection per thread). Each public
    method that writes is one transaction (:meth:`_tx`); the SQL of each table is in its
    module of :mod:`edge_agent.state`."""

    def __init__(
        self,
        path: Path,
        *,
        outbox_max_messages: int = 10000,
        pacs_levels: Collection[str] = (),
    ) -> None:
        """Open (or create) the state database at ``path``.

        Raises ConfigError ``state_dir`` when the folder cannot hold it (a file, read-only,
        not writable) or its schema is unknown, CorruptState when the file is damaged (it is
        left as it is: :func:`open_state` sets it aside), ResourceMissing when its disk is
        full or another process holds it. ``pacs_levels``: the triage levels whose results
        are also queued for the PACS (``pacs.levels`` when ``pacs.enabled``).
        """
        self.path = path
        self._outbox = OutboxCap(outbox_max_messages, pacs_levels)
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
        try:
            with self._tx() as c:  # the tables and migrations: all of them or none
                schema.create(c, path)
        except sqlite3.Error as exc:
            self.close()
            err = state_error(exc, path)
            if err is None:
                raise
            raise err from exc
        except BaseException:
            self.close()
            raise

    @property
    def outbox_max_messages(self) -> int:
        return self._outbox.max_messages

    # -- plumbing ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One step: committed whole (and synced) or rolled back whole."""
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

    def secret(self, name: str) -> bytes:
        """A random 32-byte secret of this database, kept in ``meta`` under ``name`` and
        created on first use (the key of ``P/rejected``'s file ids)."""
        with self._tx() as c:
            return meta.secret(c, name)

    # -- intake -----------------------------------------------------------------------------

    def file_signatures(self) -> dict[str, tuple[int, int]]:
        """Every path already handled, with the (size, mtime_ns) it had then."""
        return files.signatures(self._conn())

    def add_instance(
        self, path: str, size: int, mtime_ns: int, inst: InstanceRecord, now: float
    ) -> FileStatus:
        """Record a readable instance, with its file, and restart its study's quiet timer.

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
            return studies.add_instance(c, path, size, mtime_ns, inst, now)

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
            files.record(
                c, path, size, mtime_ns, status, reason, sop_instance_uid, study_instance_uid, now
            )
            if message is not None:
                self._outbox.enqueue(c, message, now)

    # -- studies ----------------------------------------------------------------------------

    def complete_quiet_studies(self, quiet_seconds: float, now: float) -> list[str]:
        """Mark open studies without a new instance for ``quiet_seconds`` complete."""
        with self._tx() as c:
            return studies.complete_quiet(c, quiet_seconds, now)

    def studies_in_state(self, state: str) -> list[str]:
        return studies.in_state(self._conn(), state)

    def study(self, study_instance_uid: str) -> StudyRow | None:
        return studies.study(self._conn(), study_instance_uid)

    def instances(self, study_instance_uid: str) -> list[InstanceRow]:
        return studies.instances(self._conn(), study_instance_uid)

    def rejected_count(self, study_instance_uid: str) -> int:
        return files.rejected_count(self._conn(), study_instance_uid)

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
        same transaction (a crash cannot lose it). The study's first result is counted in
        the daily tallies in that transaction too (:mod:`edge_agent.state.tallies`).

        Returns False (and changes nothing) when the study changed while it was being
        scored: a new instance re-opened it, so it will be scored again once quiet.
        """
        assert result.alert_id is not None
        uid, revision = study.study_instance_uid, study.revision
        with self._tx() as c:
            if not studies.unchanged_since(c, study):
                return False
            inserted = alerts.add_result(
                c, result.alert_id, uid, revision, triage, result.payload, now
            )
            studies.mark_scored(c, uid, triage, instance_states)
            if inserted:  # a result stored before a crash is not queued (or counted) twice
                tallies.count_first(c, uid, result.alert_id, triage, result.payload, now)
                alerts.supersede_older(c, uid, revision)
                self._outbox.enqueue(c, result._replace(triage=triage), now)
                if triage == "urgent":
                    alerts.add_alert(c, result.alert_id, uid, revision, result.topic, now)
                for msg in rejects:
                    self._outbox.enqueue(c, msg, now)
                if narrative is not None:
                    job = narrative._replace(
                        alert_id=result.alert_id, study_instance_uid=uid, revision=revision
                    )
                    narratives.add_job(c, job, now)
            return True

    # -- draft narratives -------------------------------------------------------------------

    def narrative_jobs(self) -> list[NarrativeJob]:
        """Narratives still to write, oldest first (those of a crash included)."""
        return narratives.jobs(self._conn())

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
        ``topic``. Returns the new revision, or None when the study moved on (re-opened by a
        late instance, whose revision gets its own narrative): the job is then dropped.
        """
        with self._tx() as c:
            return narratives.commit(c, self._outbox, job, topic, build, now)

    # -- alerts: acknowledgement and re-notification ----------------------------------------

    def acknowledge(
        self, study_instance_uid: str, alert_id: str, by: str | None, at: str | None
    ) -> AckOutcome:
        """Record a dashboard's ack of ``alert_id``; it stops that alert's re-notification
        (and drops a queued one). An ack names one alert: an older revision's alert_id does
        not silence a newer one, except the revision that only adds the alert's draft
        narrative (same findings), which the ack of either silences."""
        with self._tx() as c:
            return alerts.acknowledge(c, study_instance_uid, alert_id, by, at)

    def enqueue_renotifications(self, now: float, every: float, limit: int) -> int:
        """Queue the urgent results due again: not acknowledged, last delivered at least
        ``every`` seconds ago, nothing of theirs in the outbox, fewer than ``limit``
        re-notifications so far. An alert past its limit is marked ``unacknowledged``
        (logged). Returns how many were queued."""
        with self._tx() as c:
            return alerts.enqueue_renotifications(c, self._outbox, now, every, limit)

    def alert(self, alert_id: str) -> dict[str, object] | None:
        """An urgent alert's state (for status and tests)."""
        return alerts.alert(self._conn(), alert_id)

    # -- outbox (edge_agent.mqtt.Outbox) ----------------------------------------------------

    def outbox_pending(self, limit: int, exclude: Collection[int]) -> list[OutboxMessage]:
        """The oldest messages not set aside, but of each study topic only its oldest such
        message: the next one is offered once that one has left (PUBACK) or been set
        aside, so a study's messages reach the broker in order. Rejected-file messages are
        not ordered."""
        return outbox.pending(self._conn(), limit, exclude)

    def outbox_delete(self, message_id: int) -> None:
        """The broker acknowledged the message: it leaves (an urgent alert's clock starts)."""
        with self._tx() as c:
            outbox.delete(c, message_id)

    def outbox_set_aside(self, message_id: int, reason: str) -> bool:
        """Mark a message as set aside (it stays; see the module's docstring), with the
        time and ``reason``; counted in ``set_aside`` the first time. True when it was not
        set aside before; False also when it has left the outbox meanwhile."""
        with self._tx() as c:
            return outbox.set_aside(c, message_id, reason)

    def outbox_set_aside_messages(self) -> list[OutboxMessage]:
        """The messages set aside, oldest first (the publisher tries them again)."""
        return outbox.set_aside_messages(self._conn())

    def note_delivery(self, last_error: str | None, counts: dict[str, int]) -> None:
        """Keep the publisher's figures where ``edge-agent status`` reads them: its latest
        delivery problem (``meta.mqtt_last_error``) and counts to add (ack counters)."""
        with self._tx() as c:
            meta.note_delivery(c, last_error, counts)

    def outbox_messages(self) -> list[OutboxMessage]:
        """Every queued message, oldest first, whether or not it is offered yet (for
        inspection; the publisher uses :meth:`outbox_pending`)."""
        return outbox.messages(self._conn())

    def outbox_depth(self) -> int:
        return outbox.depth(self._conn())

    # -- the PACS destination ---------------------------------------------------------------

    def pacs_due(self, now: float, limit: int = 10) -> list[PacsRow]:
        """Results whose next attempt to reach the PACS has come, oldest first."""
        return pacs.due(self._conn(), now, limit)

    def pacs_next_due(self) -> float | None:
        return pacs.next_due(self._conn())

    def pacs_stored(self, alert_id: str, now: float) -> None:
        with self._tx() as c:
            pacs.stored(c, alert_id, now)

    def pacs_failed(self, alert_id: str, reason: str, next_at: float) -> None:
        with self._tx() as c:
            pacs.failed(c, alert_id, reason, next_at)

    def pacs_depth(self) -> int:
        return pacs.depth(self._conn())

    # -- reporting --------------------------------------------------------------------------

    def recent_tallies(self, now: float) -> tallies.Recent:
        """Today's and the last 7 UTC days' tallies at ``now`` (what ``edge-agent status``
        and ``/metrics`` show, for ``P/status``)."""
        return tallies.recent(self._conn(), now)

    def counters(self) -> dict[str, int]:
        """The counters of ``P/status`` (:func:`edge_agent.state.report.status_counters`:
        the same figures as ``edge-agent status`` and ``/metrics``)."""
        figures = report.read(self._conn())
        near = self._outbox.note_depth(figures.outbox)
        return report.status_counters(figures, self.outbox_max_messages, near)


def open_state(
    path: Path, *, outbox_max_messages: int = 10000, pacs_levels: Collection[str] = ()
) -> tuple[Store, Path | None]:
    """The agent's store at ``path``; a damaged database is set aside first (never deleted)
    and the agent starts with an empty one. Returns the store and where the damaged file went.

    Keeping on triaging matters more, beside a scanner, than what the old file held: its
    results that were not delivered yet stay in it for an operator (``sqlite3 FILE .recover``).
    """
    try:
        return Store(path, outbox_max_messages=outbox_max_messages, pacs_levels=pacs_levels), None
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
        return (
            Store(path, outbox_max_messages=outbox_max_messages, pacs_levels=pacs_levels),
            aside,
        )
