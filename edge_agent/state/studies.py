"""Instances and studies: an instance opens or re-opens its study; a quiet study completes;
a scored study's instances keep their fate (``instances``, ``studies``)."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import Literal

from . import files
from .files import FileStatus

logger = logging.getLogger(__name__)

View = Literal["frontal", "lateral", "unknown", "other"]


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


def add_instance(
    conn: sqlite3.Connection, path: str, size: int, mtime_ns: int, inst: InstanceRecord, now: float
) -> FileStatus:
    """Record a readable instance with its file and restart its study's quiet timer (see
    :meth:`edge_agent.store.Store.add_instance`)."""
    known = conn.execute(
        "SELECT state, path FROM instances WHERE sop_instance_uid = ?", (inst.sop_instance_uid,)
    ).fetchone()
    replaces = known is not None and known[0] == "rejected"
    dup = known is not None and not replaces
    status: FileStatus = "duplicate" if dup and known[1] != path else "accepted"
    files.record(
        conn,
        path,
        size,
        mtime_ns,
        status,
        None,
        inst.sop_instance_uid,
        inst.study_instance_uid,
        now,
    )
    if dup:
        return status
    study = conn.execute(
        "SELECT state FROM studies WHERE study_instance_uid = ?", (inst.study_instance_uid,)
    ).fetchone()
    if study is None:
        conn.execute(
            "INSERT INTO studies (study_instance_uid, modality, accession_number, state, "
            "revision, first_instance_at, last_instance_at) VALUES (?, ?, ?, 'open', 1, ?, ?)",
            (inst.study_instance_uid, inst.modality, inst.accession_number, now, now),
        )
    else:
        bump = 1 if study[0] == "scored" else 0
        conn.execute(
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
        conn.execute(
            "UPDATE instances SET study_instance_uid = ?, series_instance_uid = ?, "
            "path = ?, modality = ?, view = ?, received_at = ?, state = 'pending', "
            "reason = NULL WHERE sop_instance_uid = ?",
            values,
        )
    else:
        conn.execute(
            "INSERT INTO instances (study_instance_uid, series_instance_uid, path, "
            "modality, view, received_at, sop_instance_uid) VALUES (?, ?, ?, ?, ?, ?, ?)",
            values,
        )
    return status


def complete_quiet(conn: sqlite3.Connection, quiet_seconds: float, now: float) -> list[str]:
    """Mark open studies without a new instance for ``quiet_seconds`` complete."""
    rows = conn.execute(
        "SELECT study_instance_uid FROM studies WHERE state = 'open' "
        "AND last_instance_at <= ? ORDER BY last_instance_at",
        (now - quiet_seconds,),
    ).fetchall()
    uids = [r[0] for r in rows]
    conn.executemany(
        "UPDATE studies SET state = 'complete', complete_at = ? WHERE study_instance_uid = ?",
        [(now, uid) for uid in uids],
    )
    return uids


def in_state(conn: sqlite3.Connection, state: str) -> list[str]:
    rows = conn.execute(
        "SELECT study_instance_uid FROM studies WHERE state = ? ORDER BY complete_at, "
        "last_instance_at",
        (state,),
    )
    return [r[0] for r in rows]


def study(conn: sqlite3.Connection, study_instance_uid: str) -> StudyRow | None:
    row = conn.execute(
        "SELECT study_instance_uid, modality, accession_number, state, revision, "
        "first_instance_at, last_instance_at, complete_at, triage FROM studies "
        "WHERE study_instance_uid = ?",
        (study_instance_uid,),
    ).fetchone()
    return StudyRow(*row) if row else None


def instances(conn: sqlite3.Connection, study_instance_uid: str) -> list[InstanceRow]:
    rows = conn.execute(
        "SELECT sop_instance_uid, series_instance_uid, path, modality, view, state, reason "
        "FROM instances WHERE study_instance_uid = ? ORDER BY received_at, sop_instance_uid",
        (study_instance_uid,),
    )
    return [InstanceRow(*r) for r in rows]


def unchanged_since(conn: sqlite3.Connection, snapshot: StudyRow) -> bool:
    """The study is still complete as in ``snapshot`` (no instance re-opened it since)."""
    row = conn.execute(
        "SELECT state, revision, last_instance_at FROM studies WHERE study_instance_uid = ?",
        (snapshot.study_instance_uid,),
    ).fetchone()
    return bool(row == ("complete", snapshot.revision, snapshot.last_instance_at))


def mark_scored(
    conn: sqlite3.Connection,
    study_instance_uid: str,
    triage: str,
    instance_states: dict[str, tuple[str, str | None]],
) -> None:
    """The study is scored at ``triage``; each instance's fate (state, reason)."""
    conn.execute(
        "UPDATE studies SET state = 'scored', triage = ? WHERE study_instance_uid = ?",
        (triage, study_instance_uid),
    )
    conn.executemany(
        "UPDATE instances SET state = ?, reason = ? WHERE sop_instance_uid = ?",
        [(state, reason, uid) for uid, (state, reason) in instance_states.items()],
    )
