"""The ``files`` table: every path read from the watch folder and what became of it."""

from __future__ import annotations

import sqlite3
from typing import Literal

FileStatus = Literal["accepted", "duplicate", "rejected", "skipped"]


def signatures(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """Every path already handled, with the (size, mtime_ns) it had then."""
    rows = conn.execute("SELECT path, size, mtime_ns FROM files")
    return {path: (size, mtime) for path, size, mtime in rows}


def record(
    conn: sqlite3.Connection,
    path: str,
    size: int,
    mtime_ns: int,
    status: FileStatus,
    reason: str | None,
    sop_instance_uid: str | None,
    study_instance_uid: str | None,
    now: float,
) -> None:
    """What became of the file at ``path`` (replacing what it was before)."""
    conn.execute(
        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (path, size, mtime_ns, status, reason, sop_instance_uid, study_instance_uid, now),
    )


def rejected_count(conn: sqlite3.Connection, study_instance_uid: str) -> int:
    """Files of the study that were rejected at intake."""
    row = conn.execute(
        "SELECT count(*) FROM files WHERE study_instance_uid = ? AND status = 'rejected'",
        (study_instance_uid,),
    ).fetchone()
    return int(row[0])
