"""A stored study result as the row the page shows, and the worklist's order.

The order is one rule, :func:`rank`, computed here and sent with every row, so that the page
sorts rows that arrive live exactly as the server sorted the first page: unacknowledged
urgent first, then review, then acknowledged urgent, routine and not scored; newest first
within each.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from ..results import StudyResult

LEVEL_RANK = {"review": 1, "routine": 3, "not_scored": 4}


def rank(triage: str, acknowledged: bool) -> int:
    """The group a row sorts in (lower first); newest first within a group."""
    if triage == "urgent":
        return 2 if acknowledged else 0
    return LEVEL_RANK.get(triage, 4)


def timestamp(text: str | None) -> float | None:
    """Seconds since the epoch of an ISO 8601 time (``Z`` or an offset), else None."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def utc_iso(ts: float) -> str:
    """UTC ISO 8601 with milliseconds and ``Z``."""
    moment = datetime.fromtimestamp(ts, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Ack:
    alert_id: str
    by: str
    at: str


def carries_ack(result: StudyResult) -> bool:
    """True for the revision that only adds an urgent flag's narrative outcome: the agent
    counts an ack of the flag for it, so the row stays acknowledged."""
    return result.narrative_status in ("ok", "timeout", "failed")


def row(
    result: StudyResult,
    *,
    site: str,
    device_id: str,
    previous_triage: str | None,
) -> dict[str, Any]:
    """What the page needs of one study (JSON), as stored; :func:`present` adds what
    changes without a new result (the ack, the order, the viewer link). Every string in it
    came from a box."""
    top = max(result.findings, key=lambda f: f.score, default=None)
    complete_ts = timestamp(result.timing.complete_at)
    narrative = result.narrative
    return {
        "study_instance_uid": result.study_instance_uid,
        "accession_number": result.accession_number,
        "site": site,
        "device_id": device_id,
        "box": f"{site}/{device_id}",
        "modality": result.modality,
        "triage": result.triage,
        "previous_triage": previous_triage,
        "reason": result.reason,
        "revision": result.revision,
        "alert_id": result.alert_id,
        "notify_count": result.notify_count,
        "top_label": top.label if top else None,
        "top_score": round(top.score, 3) if top else None,
        "complete_at": result.timing.complete_at,
        "complete_ts": complete_ts,
        "demo": result.model.demo,
        "model": f"{result.model.name} {result.model.version}",
        "narrative_status": result.narrative_status,
        "narrative": narrative.text if narrative else None,
        "narrative_disclaimer": narrative.disclaimer if narrative else None,
    }


def present(stored: dict[str, Any], viewer_url: str | None) -> dict[str, Any]:
    """A row as the store holds it (ack fields included) with its rank and viewer link."""
    uid = stored["study_instance_uid"]
    link = viewer_url.format(study_instance_uid=quote(uid, safe="")) if viewer_url else None
    return {
        **stored,
        "rank": rank(stored["triage"], stored.get("acked_alert_id") is not None),
        "viewer_url": link,
    }


def sort_key(item: dict[str, Any]) -> tuple[int, float]:
    return item["rank"], -(item["complete_ts"] or 0.0)
