"""The PACS destination of the outbox: one row per study result still to be stored in the
site's PACS as a DICOM SR (``pacs_outbox``), with its own attempts, next attempt and last
error, apart from the MQTT outbox (a PACS outage never holds MQTT back, nor the reverse).

A row is queued in the transaction that stores its result (see
:meth:`~edge_agent.state.outbox.OutboxCap.enqueue`), so a crash cannot lose it; it leaves
only when the PACS has answered the C-STORE with success. The SR is built from the stored
result when it is sent: the row holds no patient data.
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

from . import meta


class PacsRow(NamedTuple):
    alert_id: str
    payload: bytes
    attempts: int


def enqueue(conn: sqlite3.Connection, alert_id: str, now: float) -> None:
    """Queue the result ``alert_id`` for the PACS (once: its retries are the row's)."""
    conn.execute(
        "INSERT OR IGNORE INTO pacs_outbox (alert_id, created_at, next_attempt_at) "
        "VALUES (?, ?, ?)",
        (alert_id, now, now),
    )


def due(conn: sqlite3.Connection, now: float, limit: int) -> list[PacsRow]:
    """Rows whose next attempt has come, oldest result first."""
    rows = conn.execute(
        "SELECT p.alert_id, r.payload, p.attempts FROM pacs_outbox p "
        "JOIN results r ON r.alert_id = p.alert_id "
        "WHERE p.next_attempt_at <= ? ORDER BY p.created_at, p.alert_id LIMIT ?",
        (now, limit),
    ).fetchall()
    return [PacsRow(a, bytes(p), n) for a, p, n in rows]


def next_due(conn: sqlite3.Connection) -> float | None:
    (when,) = conn.execute("SELECT MIN(next_attempt_at) FROM pacs_outbox").fetchone()
    return None if when is None else float(when)


def stored(conn: sqlite3.Connection, alert_id: str, now: float) -> None:
    """The PACS stored it at ``now``: the row leaves, the counter counts it, the result
    keeps the time (``results.pacs_stored_at``, time to PACS)."""
    if conn.execute("DELETE FROM pacs_outbox WHERE alert_id = ?", (alert_id,)).rowcount:
        meta.count(conn, "pacs_stored")
        conn.execute(
            "UPDATE results SET pacs_stored_at = ? WHERE alert_id = ? AND pacs_stored_at IS NULL",
            (now, alert_id),
        )


def failed(conn: sqlite3.Connection, alert_id: str, reason: str, next_at: float) -> None:
    """An attempt failed: the row stays, with its reason and its next attempt; the reason is
    also the destination's last error (``meta.pacs_last_error``)."""
    conn.execute(
        "UPDATE pacs_outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
        "WHERE alert_id = ?",
        (next_at, reason, alert_id),
    )
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('pacs_last_error', ?)", (reason,)
    )
    meta.count(conn, "pacs_failed_attempts")


def depth(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM pacs_outbox").fetchone()[0])
