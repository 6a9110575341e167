"""The board's SQLite file: what it received and what its users did.

    results    every revision received (alert_id), with the box it came from
    studies    the latest revision of each study: the worklist row (JSON) and its ack
    boxes      each box's latest retained status
    rejected   files a box could not use
    audit      every acknowledgement (user, time, alert_id, outcome): never updated or deleted

Written on paho's network thread (results, status, rejects) and on the web server's worker
threads (acks, audit); one connection behind one lock. ``synchronous=FULL``: an ack the page
confirmed survives a power cut, not only a restart.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..results import StudyResult
from .worklist import Ack, carries_ack, row, timestamp

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    alert_id TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    site TEXT NOT NULL,
    device_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    triage TEXT NOT NULL,
    notify_count INTEGER NOT NULL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_study ON results (study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    device_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    alert_id TEXT NOT NULL,
    triage TEXT NOT NULL,
    accession_number TEXT,
    complete_ts REAL,
    received_at REAL NOT NULL,
    row TEXT NOT NULL,
    acked_alert_id TEXT,
    acked_by TEXT,
    acked_at TEXT
);
CREATE INDEX IF NOT EXISTS studies_complete ON studies (complete_ts);
CREATE INDEX IF NOT EXISTS studies_accession ON studies (accession_number);
CREATE TABLE IF NOT EXISTS boxes (
    site TEXT NOT NULL,
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (site, device_id)
);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY,
    site TEXT NOT NULL,
    device_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    user TEXT NOT NULL,
    action TEXT NOT NULL,
    study_instance_uid TEXT,
    alert_id TEXT,
    box TEXT,
    outcome TEXT NOT NULL
);
"""

REJECTED_KEPT_PER_BOX = 200
"""Rejected-file messages kept per box (the box's own state has them all)."""


class BoardStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- from the boxes ------------------------------------------------------------------

    def add_result(
        self, site: str, device_id: str, result: StudyResult, payload: bytes, now: float
    ) -> dict[str, Any] | None:
        """Record a result; the study's row when the worklist changes, None for a copy
        already held (at-least-once delivery), a re-notification of an alert already shown
        (its count is kept) or an older revision than the one shown."""
        uid = result.study_instance_uid
        with self._tx() as c:
            known = c.execute(
                "SELECT notify_count FROM results WHERE alert_id = ?", (result.alert_id,)
            ).fetchone()
            if known is not None:
                c.execute(
                    "UPDATE results SET notify_count = max(notify_count, ?) WHERE alert_id = ?",
                    (result.notify_count, result.alert_id),
                )
                return None
            c.execute(
                "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    result.alert_id,
                    uid,
                    site,
                    device_id,
                    result.revision,
                    result.triage,
                    result.notify_count,
                    payload.decode(),
                    now,
                ),
            )
            shown = c.execute(
                "SELECT revision, triage, row, acked_alert_id, acked_by, acked_at "
                "FROM studies WHERE study_instance_uid = ?",
                (uid,),
            ).fetchone()
            previous: str | None = None
            ack: tuple[Any, Any, Any] = (None, None, None)
            if shown is not None:
                revision, triage, stored, *ack_fields = shown
                if result.revision < revision:
                    return None  # a late copy of an older revision: the row shows a newer one
                previous = json.loads(stored)["previous_triage"]
                if result.revision > revision:
                    # A level never changes silently: the row says what it was.
                    previous = triage if triage != result.triage else previous
                    if carries_ack(result):
                        ack = (ack_fields[0], ack_fields[1], ack_fields[2])
                else:
                    ack = (ack_fields[0], ack_fields[1], ack_fields[2])
            stored_row = row(result, site=site, device_id=device_id, previous_triage=previous)
            c.execute(
                "INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    uid,
                    site,
                    device_id,
                    result.revision,
                    result.alert_id,
                    result.triage,
                    result.accession_number,
                    stored_row["complete_ts"],
                    now,
                    json.dumps(stored_row),
                    *ack,
                ),
            )
            return _present(stored_row, *ack)

    def set_status(
        self, site: str, device_id: str, status: dict[str, Any] | None, now: float
    ) -> dict[str, Any]:
        """Record a box's retained status (None: the retained message was cleared). The
        Will carries only ``state``: the box's model and counters are kept from before."""
        with self._tx() as c:
            if status is None:
                c.execute("DELETE FROM boxes WHERE site = ? AND device_id = ?", (site, device_id))
                return {"box": f"{site}/{device_id}", "removed": True}
            old = c.execute(
                "SELECT status FROM boxes WHERE site = ? AND device_id = ?", (site, device_id)
            ).fetchone()
            merged = {**(json.loads(old[0]) if old else {}), **status}
            c.execute(
                "INSERT OR REPLACE INTO boxes VALUES (?, ?, ?, ?)",
                (site, device_id, json.dumps(merged), now),
            )
        return _box(site, device_id, merged, now)

    def add_rejected(
        self, site: str, device_id: str, payload: dict[str, Any], now: float
    ) -> dict[str, Any]:
        with self._tx() as c:
            c.execute(
                "INSERT INTO rejected (site, device_id, payload, received_at) VALUES (?, ?, ?, ?)",
                (site, device_id, json.dumps(payload), now),
            )
            c.execute(
                "DELETE FROM rejected WHERE site = ? AND device_id = ? AND id NOT IN "
                "(SELECT id FROM rejected WHERE site = ? AND device_id = ? "
                "ORDER BY id DESC LIMIT ?)",
                (site, device_id, site, device_id, REJECTED_KEPT_PER_BOX),
            )
        return _rejected(site, device_id, payload, now)

    # -- acks ----------------------------------------------------------------------------

    def acknowledge(self, uid: str, ack: Ack) -> dict[str, Any] | None:
        """Mark the study's row acknowledged when ``ack`` names its current alert (or the
        one its narrative revision carries on); the row, or None when nothing changed."""
        with self._tx() as c:
            shown = c.execute(
                "SELECT alert_id, row, acked_alert_id FROM studies WHERE study_instance_uid = ?",
                (uid,),
            ).fetchone()
            if shown is None or shown[2] is not None:
                return None
            current = shown[0]
            carried = json.loads(shown[1])["narrative_status"] in ("ok", "timeout", "failed")
            if ack.alert_id != current and not (
                carried and self._earlier_alert_of(c, uid, ack.alert_id)
            ):
                return None
            c.execute(
                "UPDATE studies SET acked_alert_id = ?, acked_by = ?, acked_at = ? "
                "WHERE study_instance_uid = ?",
                (ack.alert_id, ack.by, ack.at, uid),
            )
            return _present(json.loads(shown[1]), ack.alert_id, ack.by, ack.at)

    @staticmethod
    def _earlier_alert_of(c: sqlite3.Connection, uid: str, alert_id: str) -> bool:
        return (
            c.execute(
                "SELECT 1 FROM results WHERE alert_id = ? AND study_instance_uid = ?",
                (alert_id, uid),
            ).fetchone()
            is not None
        )

    def audit(
        self, *, user: str, action: str, uid: str, alert_id: str, box: str, outcome: str, at: str
    ) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO audit (at, user, action, study_instance_uid, alert_id, box, outcome) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (at, user, action, uid, alert_id, box, outcome),
            )

    # -- reads ---------------------------------------------------------------------------

    def study(self, uid: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._db.execute(
                "SELECT row, acked_alert_id, acked_by, acked_at FROM studies "
                "WHERE study_instance_uid = ?",
                (uid,),
            ).fetchone()
        return _present(json.loads(found[0]), *found[1:]) if found else None

    def worklist(self, since_ts: float, limit: int) -> list[dict[str, Any]]:
        """Studies completed since ``since_ts``, any order: at most ``limit``, every
        unacknowledged urgent one first (a busy day must not push one off), then the newest."""
        with self._lock:
            found = self._db.execute(
                "SELECT row, acked_alert_id, acked_by, acked_at FROM studies "
                "WHERE complete_ts >= ? OR complete_ts IS NULL "
                "ORDER BY (triage = 'urgent' AND acked_alert_id IS NULL) DESC, "
                "complete_ts DESC LIMIT ?",
                (since_ts, limit),
            ).fetchall()
        return [_present(json.loads(r[0]), *r[1:]) for r in found]

    def search(self, text: str, limit: int = 50) -> list[dict[str, Any]]:
        """Studies whose StudyInstanceUID starts with ``text`` or whose accession number is
        ``text`` (only boxes allowed to publish it send one)."""
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self._lock:
            found = self._db.execute(
                "SELECT row, acked_alert_id, acked_by, acked_at FROM studies "
                "WHERE study_instance_uid LIKE ? ESCAPE '\\' OR accession_number = ? "
                "ORDER BY complete_ts DESC LIMIT ?",
                (escaped + "%", text, limit),
            ).fetchall()
        return [_present(json.loads(r[0]), *r[1:]) for r in found]

    def revisions(self, uid: str) -> list[dict[str, Any]]:
        """Every revision held of a study, oldest first (its level's history)."""
        with self._lock:
            found = self._db.execute(
                "SELECT revision, triage, alert_id, notify_count, received_at FROM results "
                "WHERE study_instance_uid = ? ORDER BY revision",
                (uid,),
            ).fetchall()
        return [
            {"revision": r[0], "triage": r[1], "alert_id": r[2], "notify_count": r[3]}
            for r in found
        ]

    def boxes(self) -> list[dict[str, Any]]:
        with self._lock:
            found = self._db.execute(
                "SELECT site, device_id, status, seen_at FROM boxes ORDER BY site, device_id"
            ).fetchall()
        return [_box(s, d, json.loads(p), seen) for s, d, p, seen in found]

    def rejected(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            found = self._db.execute(
                "SELECT site, device_id, payload, received_at FROM rejected "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_rejected(s, d, json.loads(p), at) for s, d, p, at in found]

    def audit_log(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            found = self._db.execute(
                "SELECT at, user, action, study_instance_uid, alert_id, box, outcome "
                "FROM audit ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("at", "user", "action", "study_instance_uid", "alert_id", "box", "outcome")
        return [dict(zip(keys, r, strict=True)) for r in found]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM studies").fetchone()[0])


def _present(
    stored: dict[str, Any], alert_id: str | None, by: str | None, at: str | None
) -> dict[str, Any]:
    """The stored row with its ack fields (the viewer link and order are the app's)."""
    return {
        **stored,
        "acked_alert_id": alert_id,
        "acked_by": by if alert_id else None,
        "acked_at": at if alert_id else None,
    }


def _box(site: str, device_id: str, status: dict[str, Any], seen_at: float) -> dict[str, Any]:
    state = status.get("state")
    return {
        "box": f"{site}/{device_id}",
        "state": state if state in ("online", "offline", "stopped") else "unknown",
        "model": _text(status.get("model")),
        "model_version": _text(status.get("model_version")),
        "demo": status.get("demo") is True,
        "outbox_depth": _number(status.get("outbox_depth")),
        "urgent_unacknowledged": _number(status.get("urgent_unacknowledged")),
        "status_at": _text(status.get("at")),
        "seen_ts": seen_at,
        "seen_age_ts": timestamp(_text(status.get("at"))) or seen_at,
    }


def _rejected(site: str, device_id: str, payload: dict[str, Any], at: float) -> dict[str, Any]:
    return {
        "box": f"{site}/{device_id}",
        "reason": _text(payload.get("reason")),
        "file_id": _text(payload.get("file_id")),
        "path": _text(payload.get("path")),
        "sop_instance_uid": _text(payload.get("sop_instance_uid")),
        "received_ts": at,
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
