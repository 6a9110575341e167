"""Results and the urgent alerts they raise (``results``, ``alerts``).

An urgent result's alert is ``pending`` until a dashboard acknowledges it; while pending it
is re-notified; past the limit it is ``unacknowledged``; a newer revision of its study makes
it ``superseded``. A narrative revision carries its flag's alert on under its own alert id
(``carried_from``): an ack of either acknowledges both.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Literal

from ..results import StudyResult
from . import meta, outbox
from .outbox import Message, OutboxCap

logger = logging.getLogger(__name__)

AckOutcome = Literal["acknowledged", "already acknowledged", "superseded", "not an urgent alert"]

LIVE_STATES = ("pending", "unacknowledged")
"""The states of an alert no dashboard has acknowledged."""
LIVE = "(" + ", ".join(f"'{state}'" for state in LIVE_STATES) + ")"
"""The same, as an SQL list."""


def add_result(
    conn: sqlite3.Connection,
    alert_id: str,
    study_instance_uid: str,
    revision: int,
    triage: str,
    payload: bytes,
    now: float,
    *,
    replace: bool = False,
) -> bool:
    """Store a result; False when one with ``alert_id`` was there already (unless
    ``replace``: a narrative revision's result is written over a crashed attempt's)."""
    verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
    cur = conn.execute(
        f"{verb} INTO results (alert_id, study_instance_uid, revision, triage, payload, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (alert_id, study_instance_uid, revision, triage, payload, now),
    )
    return cur.rowcount > 0


def add_alert(
    conn: sqlite3.Connection,
    alert_id: str,
    study_instance_uid: str,
    revision: int,
    topic: str,
    now: float,
) -> None:
    """An urgent result's alert, pending (its re-notification clock starts at PUBACK)."""
    conn.execute(
        "INSERT INTO alerts (alert_id, study_instance_uid, revision, topic, state, created_at) "
        "VALUES (?, ?, ?, ?, 'pending', ?)",
        (alert_id, study_instance_uid, revision, topic, now),
    )


def _supersede(conn: sqlite3.Connection, alert_id: str) -> None:
    conn.execute("UPDATE alerts SET state = 'superseded' WHERE alert_id = ?", (alert_id,))
    outbox.drop_renotification(conn, alert_id)


def supersede_older(conn: sqlite3.Connection, study_instance_uid: str, revision: int) -> None:
    """A newer revision's result replaces the re-notification of older urgent ones."""
    older = [
        r[0]
        for r in conn.execute(
            f"SELECT alert_id FROM alerts WHERE study_instance_uid = ? AND revision < ? "
            f"AND state IN {LIVE}",
            (study_instance_uid, revision),
        )
    ]
    for alert in older:
        _supersede(conn, alert)
        logger.info(
            "urgent alert %s of study %s superseded by revision %d: not re-notified any more",
            alert,
            study_instance_uid,
            revision,
        )


def carry_over(
    conn: sqlite3.Connection,
    flag: str,
    msg: Message,
    study_instance_uid: str,
    revision: int,
    now: float,
) -> None:
    """The alert of ``flag`` (if any) goes on as ``msg``'s alert (a narrative revision):
    acknowledged stays acknowledged; notification goes on under the new alert id."""
    alert = conn.execute(
        "SELECT state, notify_count, last_notified_at, acked_by, acked_at, ack_taken_at "
        "FROM alerts WHERE alert_id = ?",
        (flag,),
    ).fetchone()
    if alert is None:
        return
    state = alert[0] if alert[0] != "superseded" else "pending"
    conn.execute(
        "INSERT OR REPLACE INTO alerts (alert_id, study_instance_uid, revision, topic, state, "
        "notify_count, last_notified_at, acked_by, acked_at, ack_taken_at, created_at, "
        "carried_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (msg.alert_id, study_instance_uid, revision, msg.topic, state, *alert[1:], now, flag),
    )
    if alert[0] in LIVE_STATES:
        _supersede(conn, flag)


def acknowledge(
    conn: sqlite3.Connection, study_instance_uid: str, alert_id: str, by: str | None, at: str | None
) -> AckOutcome:
    """A dashboard's ack of ``alert_id`` (see :meth:`edge_agent.store.Store.acknowledge`)."""
    row = conn.execute(
        "SELECT state FROM alerts WHERE alert_id = ? AND study_instance_uid = ?",
        (alert_id, study_instance_uid),
    ).fetchone()
    if row is None:
        return "not an urgent alert"
    if row[0] == "acknowledged":
        return "already acknowledged"
    # ``at`` is the dashboard's word; ``ack_taken_at`` is the agent's own clock, which time
    # to acknowledgement is measured with: the first ack's, a repeated one does not move it.
    taken = time.time()
    conn.execute(
        "UPDATE alerts SET acked_by = ?, acked_at = ?, "
        "ack_taken_at = COALESCE(ack_taken_at, ?) WHERE alert_id = ?",
        (by, at, taken, alert_id),
    )
    # A narrative revision carries the flag's alert on under a new alert id (and is never
    # narrated itself): an ack of either acknowledges both (the dashboard may ack the flag
    # while its narrative is on the way).
    live = [
        r[0]
        for r in conn.execute(
            f"SELECT alert_id FROM alerts WHERE state IN {LIVE} "
            "AND (alert_id = :a OR carried_from = :a "
            "OR alert_id = (SELECT carried_from FROM alerts WHERE alert_id = :a))",
            {"a": alert_id},
        )
    ]
    if row[0] == "superseded" and not live:
        return "superseded"
    for a in live:
        conn.execute(
            "UPDATE alerts SET state = 'acknowledged', acked_by = ?, acked_at = ?, "
            "ack_taken_at = ? WHERE alert_id = ?",
            (by, at, taken, a),
        )
        outbox.drop_renotification(conn, a)
    meta.count(conn, "acknowledged")
    return "acknowledged"


def enqueue_renotifications(
    conn: sqlite3.Connection, cap: OutboxCap, now: float, every: float, limit: int
) -> int:
    """Queue the urgent results due again (see
    :meth:`edge_agent.store.Store.enqueue_renotifications`); returns how many."""
    queued = 0
    due = conn.execute(
        "SELECT a.alert_id, a.study_instance_uid, a.topic, a.notify_count, r.payload "
        "FROM alerts AS a JOIN results AS r ON r.alert_id = a.alert_id "
        "WHERE a.state = 'pending' AND a.last_notified_at <= ? "
        "AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.alert_id = a.alert_id) "
        "ORDER BY a.last_notified_at",
        (now - every,),
    ).fetchall()
    for alert, uid, topic, count, payload in due:
        if count > limit:
            conn.execute("UPDATE alerts SET state = 'unacknowledged' WHERE alert_id = ?", (alert,))
            logger.warning(
                "urgent alert %s of study %s not acknowledged after %d notifications; "
                "not re-notified any more",
                alert,
                uid,
                count,
            )
            continue
        again = StudyResult.model_validate_json(payload).renotification(count + 1)
        cap.enqueue(conn, Message("renotify", topic, again.to_json_bytes(), alert, "urgent"), now)
        conn.execute("UPDATE alerts SET notify_count = ? WHERE alert_id = ?", (count + 1, alert))
        logger.info(
            "urgent alert %s of study %s not acknowledged: notification %d queued",
            alert,
            uid,
            count + 1,
        )
        queued += 1
    return queued


def alert(conn: sqlite3.Connection, alert_id: str) -> dict[str, object] | None:
    """An urgent alert's state (for status and tests)."""
    cur = conn.execute(
        "SELECT alert_id, study_instance_uid, revision, state, notify_count, "
        "last_notified_at, acked_by, acked_at FROM alerts WHERE alert_id = ?",
        (alert_id,),
    )
    row = cur.fetchone()
    return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None
