"""The state database's figures: THE query behind ``P/status``, ``edge-agent status`` and
``/metrics``, so the three always agree.

:func:`read` takes a connection to a database this agent wrote or an older one did (status
and metrics read it read-only, while the agent runs); what an older schema lacks reads as
none (:class:`~edge_agent.state.schema.Layout`). A narrative revision repeats its flag's
triage and findings: it is the flag's result published again, not one more result.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ResourceMissing
from .alerts import LIVE
from .schema import Layout


@dataclass(frozen=True)
class Figures:
    """What the state database says, at one moment."""

    studies: dict[str, int]
    """Studies by state (open, complete, scored)."""
    results_by_level: dict[str, int]
    """Results by triage level; a narrative revision is not counted again."""
    instances: int
    files: dict[str, int]
    """Files read, by status (accepted, duplicate, rejected, skipped)."""
    outbox: int
    outbox_oldest_at: float | None
    outbox_urgent: int
    """Outbox messages of urgent results (their re-notifications included)."""
    outbox_set_aside: int
    alerts_waiting: int
    """Urgent results no dashboard has acknowledged (pending or past the limit)."""
    narratives_pending: int | None
    """Draft narratives not written yet (None: a database from before narratives)."""
    counters: dict[str, int]
    """The agent's counters as stored (published_result, acks_received, ...)."""
    mqtt_last_error: str | None
    pacs_outbox: int | None = None
    """Results waiting for the PACS (None: a database from before the PACS destination)."""
    pacs_failing: int = 0
    """Among them, those with at least one failed attempt."""
    pacs_oldest_at: float | None = None
    pacs_last_error: str | None = None
    """The PACS destination's latest failure (kept after it recovers; see pacs_failing)."""

    @property
    def results(self) -> int:
        return sum(self.results_by_level.values())

    def outbox_oldest_seconds(self, now: float) -> float | None:
        """How long the oldest waiting message has waited at ``now`` (None: none waits)."""
        oldest = self.outbox_oldest_at
        return None if oldest is None else max(0.0, now - oldest)


def open_read_only(database: Path) -> sqlite3.Connection:
    """A read-only connection to ``database`` (WAL: it does not block the agent)."""
    if not database.is_file():
        raise ResourceMissing(f"no state database at {database} (has the agent run here?)")
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5.0)


def read(conn: sqlite3.Connection, layout: Layout | None = None) -> Figures:
    """The figures of the database ``conn`` is connected to, in one read transaction (so
    they agree with each other even while the agent writes)."""
    if conn.in_transaction:
        return _read(conn, Layout.of(conn) if layout is None else layout)
    conn.execute("BEGIN")
    try:
        return _read(conn, Layout.of(conn) if layout is None else layout)
    finally:
        conn.execute("COMMIT")


def _read(conn: sqlite3.Connection, layout: Layout) -> Figures:

    def one(table: str, sql: str) -> Any:
        return conn.execute(sql).fetchone()[0] if layout.has(table) else 0

    def grouped(table: str, sql: str) -> dict[str, int]:
        return dict(conn.execute(sql).fetchall()) if layout.has(table) else {}

    narrated = (
        "WHERE alert_id NOT IN (SELECT alert_id FROM alerts WHERE carried_from IS NOT NULL) "
        if layout.has("alerts", "carried_from")
        else ""
    )
    aside = layout.column("outbox", "set_aside_at")
    oldest = None
    if layout.has("outbox"):
        (oldest,) = conn.execute("SELECT MIN(created_at) FROM outbox").fetchone()

    def meta_value(key: str) -> str | None:
        if not layout.has("meta"):
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    last_error = meta_value("mqtt_last_error")
    pacs_depth: int | None = None
    pacs_failing, pacs_oldest = 0, None
    if layout.has("pacs_outbox"):
        pacs_depth, pacs_failing, pacs_oldest = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0), MIN(created_at) FROM pacs_outbox"
        ).fetchone()
    return Figures(
        studies=grouped("studies", "SELECT state, COUNT(*) FROM studies GROUP BY state"),
        results_by_level=grouped(
            "results", f"SELECT triage, COUNT(*) FROM results {narrated}GROUP BY triage"
        ),
        instances=one("instances", "SELECT COUNT(*) FROM instances"),
        files=grouped("files", "SELECT status, COUNT(*) FROM files GROUP BY status"),
        outbox=one("outbox", "SELECT COUNT(*) FROM outbox"),
        outbox_oldest_at=oldest,
        outbox_urgent=(  # a message's level is its result's
            one(
                "outbox",
                "SELECT COUNT(*) FROM outbox o JOIN results r ON r.alert_id = o.alert_id "
                "WHERE r.triage = 'urgent'",
            )
            if layout.has("results")
            else 0
        ),
        outbox_set_aside=one("outbox", f"SELECT COUNT(*) FROM outbox WHERE {aside} IS NOT NULL"),
        alerts_waiting=one("alerts", f"SELECT COUNT(*) FROM alerts WHERE state IN {LIVE}"),
        narratives_pending=(
            conn.execute("SELECT COUNT(*) FROM narratives").fetchone()[0]
            if layout.has("narratives")
            else None
        ),
        counters=grouped("counters", "SELECT name, value FROM counters"),
        mqtt_last_error=last_error,
        pacs_outbox=pacs_depth,
        pacs_failing=pacs_failing,
        pacs_oldest_at=pacs_oldest,
        pacs_last_error=meta_value("pacs_last_error"),
    )


def status_counters(f: Figures, outbox_max_messages: int, near_cap: bool) -> dict[str, int]:
    """The counters of the retained ``P/status`` message (README: "Status fields")."""
    stored = f.counters
    return {
        "studies_seen": sum(f.studies.values()),
        "studies_open": sum(n for state, n in f.studies.items() if state != "scored"),
        "studies_scored": f.studies.get("scored", 0),
        "results": f.results,
        "published": stored.get("published_result", 0),
        "instances": f.instances,
        "rejected": f.files.get("rejected", 0),
        "skipped": f.files.get("skipped", 0),
        "outbox_depth": f.outbox,
        "outbox_max_messages": outbox_max_messages,
        "outbox_near_cap": near_cap,
        "outbox_dropped": stored.get("outbox_dropped", 0),
        "outbox_set_aside": f.outbox_set_aside,
        "urgent_unacknowledged": f.alerts_waiting,
        "renotified": stored.get("published_renotify", 0),
        "acknowledged": stored.get("acknowledged", 0),
        "acks_received": stored.get("acks_received", 0),
        "acks_unknown": stored.get("acks_unknown", 0),
        "acks_refused": stored.get("acks_refused", 0),
        "narratives_pending": f.narratives_pending or 0,
        "narratives_written": stored.get("narrative_ok", 0),
        "narratives_timeout": stored.get("narrative_timeout", 0),
        "narratives_failed": stored.get("narrative_failed", 0),
    }


# -- the lists edge-agent status shows ------------------------------------------------------


def set_aside(conn: sqlite3.Connection, layout: Layout, last: int) -> list[tuple[Any, ...]]:
    """(id, topic, set_aside_at, reason) of the first ``last`` messages set aside."""
    if not layout.has("outbox", "set_aside_at"):
        return []
    return conn.execute(
        "SELECT id, topic, set_aside_at, set_aside_reason FROM outbox "
        "WHERE set_aside_at IS NOT NULL ORDER BY id LIMIT ?",
        (last,),
    ).fetchall()


def last_rejected(conn: sqlite3.Connection, layout: Layout, last: int) -> list[tuple[Any, ...]]:
    """(path, reason, seen_at) of the ``last`` files rejected last, newest first."""
    if not layout.has("files"):
        return []
    return conn.execute(
        "SELECT path, reason, seen_at FROM files WHERE status = 'rejected' "
        "ORDER BY seen_at DESC LIMIT ?",
        (last,),
    ).fetchall()


def last_results(conn: sqlite3.Connection, layout: Layout, last: int) -> list[tuple[Any, ...]]:
    """(study uid, revision, triage, payload, created_at, modality) of the ``last`` results
    stored last (narrative revisions included: they show the narrative's outcome)."""
    if not layout.has("results"):
        return []
    return conn.execute(
        "SELECT r.study_instance_uid, r.revision, r.triage, r.payload, r.created_at, "
        "COALESCE(s.modality, '') FROM results r LEFT JOIN studies s "
        "ON s.study_instance_uid = r.study_instance_uid ORDER BY r.created_at DESC LIMIT ?",
        (last,),
    ).fetchall()
