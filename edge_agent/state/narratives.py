"""Draft narratives still to write (``narratives``) and their outcome as the next revision."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import NamedTuple

from ..results import StudyResult
from ..results import alert_id as _alert_id
from . import alerts, meta
from .outbox import Message, OutboxCap


class NarrativeJob(NamedTuple):
    """A draft narrative to write for the urgent result ``alert_id``."""

    alert_id: str
    study_instance_uid: str
    revision: int
    source: str
    """JSON: the image to describe (:class:`edge_agent.narrative.Source`)."""
    deadline: float
    """Unix time after which the narrative is published as 'timeout'."""


def add_job(conn: sqlite3.Connection, job: NarrativeJob, now: float) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO narratives VALUES (?, ?, ?, ?, ?, ?)",
        (*job, now),
    )


def jobs(conn: sqlite3.Connection) -> list[NarrativeJob]:
    """Narratives still to write, oldest first (those of a crash included)."""
    rows = conn.execute(
        "SELECT alert_id, study_instance_uid, revision, source, deadline FROM narratives "
        "ORDER BY created_at"
    )
    return [NarrativeJob(*row) for row in rows]


def commit(
    conn: sqlite3.Connection,
    cap: OutboxCap,
    job: NarrativeJob,
    topic: str,
    build: Callable[[StudyResult, int, str], StudyResult],
    now: float,
) -> int | None:
    """The job is done; its outcome is the study's next revision (see
    :meth:`edge_agent.store.Store.commit_narrative`). None: the study moved on."""
    conn.execute("DELETE FROM narratives WHERE alert_id = ?", (job.alert_id,))
    row = conn.execute(
        "SELECT state, revision FROM studies WHERE study_instance_uid = ?",
        (job.study_instance_uid,),
    ).fetchone()
    flag = conn.execute(
        "SELECT payload, triage FROM results WHERE alert_id = ?", (job.alert_id,)
    ).fetchone()
    if row != ("scored", job.revision) or flag is None:
        return None
    revision = job.revision + 1
    previous = StudyResult.model_validate_json(flag[0])
    uid = job.study_instance_uid
    result = build(previous, revision, _alert_id(uid, revision, previous.model.sha256))
    msg = Message("result", topic, result.to_json_bytes(), result.alert_id, flag[1])
    alerts.add_result(conn, result.alert_id, uid, revision, flag[1], msg.payload, now, replace=True)
    conn.execute("UPDATE studies SET revision = ? WHERE study_instance_uid = ?", (revision, uid))
    cap.enqueue(conn, msg, now)
    meta.count(conn, f"narrative_{result.narrative_status}")
    alerts.carry_over(conn, job.alert_id, msg, uid, revision, now)
    return revision
