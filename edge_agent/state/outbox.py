"""The outbox: messages not yet acknowledged by the broker, in per-study-topic order, under
a cap (the rules, and why, are in :mod:`edge_agent.store`'s docstring)."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Collection
from typing import Literal, NamedTuple

from . import meta, pacs

logger = logging.getLogger(__name__)

OUTBOX_NEAR_CAP = 0.8
"""Depth, as a fraction of ``outbox_max_messages``, from which status and log say "near cap"."""

# What the cap drops, in this order (oldest first within each class); never urgent.
_DROP_CLASSES = (
    "kind = 'rejected' OR triage IN ('routine', 'not_scored')",
    "triage = 'review'",
)


class OutboxMessage(NamedTuple):
    id: int
    topic: str
    payload: bytes
    qos: int


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


class OutboxCap:
    """Queues messages under the cap ``max_messages``; remembers what it last logged about
    the depth (thread-safe), so that crossing a line is logged once."""

    def __init__(self, max_messages: int, pacs_levels: Collection[str] = ()) -> None:
        self.max_messages = max_messages
        self.pacs_levels = frozenset(pacs_levels)
        self._lock = threading.Lock()
        self._near = False
        self._over_logged = False

    def enqueue(self, conn: sqlite3.Connection, msg: Message, now: float) -> None:
        """Queue ``msg``; when the outbox is full, first drop what the cap policy allows.

        The new message is the newest of its class: it is dropped itself only when nothing
        older of its class, or of a class dropped before it, is left.

        A study result of a level in ``pacs_levels`` is also queued for the PACS (its own
        destination, never dropped by this cap: a results table row it was stored with).
        """
        if msg.kind == "result" and msg.alert_id is not None and msg.triage in self.pacs_levels:
            pacs.enqueue(conn, msg.alert_id, now)
        cap = self.max_messages
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
            if not self._over_logged:
                logger.error(
                    "outbox over its cap (%d messages, cap %d) and only urgent results are "
                    "left: nothing dropped",
                    depth + 1,
                    cap,
                )
            self._over_logged = True
        else:
            self._over_logged = False
        conn.execute(
            "INSERT INTO outbox (kind, topic, payload, qos, alert_id, created_at, triage) "
            "VALUES (?, ?, ?, 1, ?, ?, ?)",
            (msg.kind, msg.topic, msg.payload, msg.alert_id, now, msg.triage),
        )
        self.note_depth(depth + 1)

    def _dropped(
        self,
        conn: sqlite3.Connection,
        kind: str,
        topic: str,
        alert: str | None,
        triage: str | None,
        which: str,
    ) -> None:
        meta.count(conn, "outbox_dropped")
        if kind == "rejected":
            what = "rejected-file message"
        else:
            what = f"{triage} study result {topic.rsplit('/', 1)[-1]} (alert {alert})"
        logger.warning("outbox full (cap %d): dropped the %s (%s)", self.max_messages, what, which)

    def note_depth(self, depth: int) -> bool:
        """Log when the outbox crosses :data:`OUTBOX_NEAR_CAP` of its cap; True when near."""
        near = depth >= OUTBOX_NEAR_CAP * self.max_messages
        with self._lock:
            changed, self._near = near != self._near, near
        if changed and near:
            logger.warning(
                "outbox near its cap: %d messages of %d (%.0f%%); the oldest non-urgent "
                "messages are dropped when it is full",
                depth,
                self.max_messages,
                100 * depth / self.max_messages,
            )
        elif changed:
            logger.info(
                "outbox below %.0f%% of its cap again (%d messages of %d)",
                100 * OUTBOX_NEAR_CAP,
                depth,
                self.max_messages,
            )
        return near


def _messages(rows: Collection[tuple[int, str, bytes, int]]) -> list[OutboxMessage]:
    return [OutboxMessage(i, t, bytes(p), q) for i, t, p, q in rows]


def pending(conn: sqlite3.Connection, limit: int, exclude: Collection[int]) -> list[OutboxMessage]:
    """The oldest messages not set aside, but of each study topic only its oldest such
    message: the next one is offered once that one has left (PUBACK) or been set aside, so
    a study's messages reach the broker in order. Rejected-file messages are not ordered."""
    excluded = set(exclude)
    rows = conn.execute(
        "SELECT id, topic, payload, qos FROM outbox AS o WHERE set_aside_at IS NULL "
        "AND (kind = 'rejected' OR id = (SELECT min(id) FROM outbox "
        "WHERE topic = o.topic AND set_aside_at IS NULL)) ORDER BY id LIMIT ?",
        (limit + len(excluded),),
    ).fetchall()
    return [m for m in _messages(rows) if m.id not in excluded][:limit]


def delete(conn: sqlite3.Connection, message_id: int) -> None:
    """The broker acknowledged ``message_id``: it leaves (counted as published); a result's
    first PUBACK is recorded (``results.published_at``) and an urgent alert's
    re-notification clock starts now. A second PUBACK changes nothing."""
    row = conn.execute("SELECT kind, alert_id FROM outbox WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        return
    conn.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
    meta.count(conn, f"published_{row[0]}")
    if row[1] is not None:
        now = time.time()
        conn.execute(
            "UPDATE alerts SET last_notified_at = ? WHERE alert_id = ? AND state = 'pending'",
            (now, row[1]),
        )
        if row[0] == "result":
            # The first PUBACK of the result (time to notification); later copies (a
            # re-sent duplicate) do not move it.
            conn.execute(
                "UPDATE results SET published_at = ? WHERE alert_id = ? AND published_at IS NULL",
                (now, row[1]),
            )


def set_aside(conn: sqlite3.Connection, message_id: int, reason: str) -> bool:
    """Mark a message as set aside, with the time and ``reason``; counted in ``set_aside``
    the first time. True when it was not set aside before; False also when it has left."""
    row = conn.execute("SELECT set_aside_at FROM outbox WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        return False
    conn.execute(
        "UPDATE outbox SET set_aside_at = ?, set_aside_reason = ? WHERE id = ?",
        (time.time(), reason, message_id),
    )
    if row[0] is None:
        meta.count(conn, "set_aside")
    return row[0] is None


def set_aside_messages(conn: sqlite3.Connection) -> list[OutboxMessage]:
    """The messages set aside, oldest first (the publisher tries them again)."""
    sql = "SELECT id, topic, payload, qos FROM outbox WHERE set_aside_at IS NOT NULL ORDER BY id"
    return _messages(conn.execute(sql).fetchall())


def messages(conn: sqlite3.Connection) -> list[OutboxMessage]:
    """Every queued message, oldest first, whether or not it is offered yet."""
    return _messages(
        conn.execute("SELECT id, topic, payload, qos FROM outbox ORDER BY id").fetchall()
    )


def depth(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])


def drop_renotification(conn: sqlite3.Connection, alert_id: str) -> None:
    """Drop ``alert_id``'s queued re-notification, if any (it was acked or superseded)."""
    conn.execute("DELETE FROM outbox WHERE kind = 'renotify' AND alert_id = ?", (alert_id,))
