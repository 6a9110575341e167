"""``edge-agent status``: the state database's view, for a person at the box.

Reads ``state_dir/state.sqlite3`` read-only (SQLite WAL lets it do so while the agent runs,
without blocking it): studies by state, the outbox and how old its oldest message is, urgent
alerts waiting for an acknowledgement, rejected files, the counters and the last results.
Never prints patient data it does not have to: UIDs, levels, scores and reasons (no
accession number). File paths are shown here, on the box, because this is where a
``P/rejected`` message's ``file_id`` is resolved (``--file``); what came from outside (paths,
element values) is shown with control characters escaped, so a file named with a terminal
escape cannot drive the terminal.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .health import HEALTH_FILE, read_health_file
from .identifiers import FILE_ID_KEY, file_id, is_file_id
from .state import report, tallies
from .state.report import open_read_only
from .state.schema import Layout
from .text import escape_controls, printable
from .waiting import read_waiting


@dataclass
class StatusReport:
    database: Path
    studies: dict[str, int] = field(default_factory=dict)
    outbox: int = 0
    outbox_urgent: int = 0
    outbox_oldest_seconds: float | None = None
    outbox_set_aside: int = 0
    """Messages the publisher set aside (kept, retried later; see ``set_aside``)."""
    set_aside: list[dict[str, Any]] = field(default_factory=list)
    mqtt_last_error: str | None = None
    """The publisher's latest delivery problem, with its UTC time."""
    pacs_outbox: int | None = None
    """Results waiting for the PACS (None: a database from before the PACS destination)."""
    pacs_failing: int = 0
    pacs_oldest_seconds: float | None = None
    pacs_last_error: str | None = None
    alerts_waiting: int = 0
    narratives_pending: int | None = None
    """Draft narratives not written yet (None: a database from before narratives)."""
    counters: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    results_by_level: dict[str, int] = field(default_factory=dict)
    last_rejected: list[dict[str, Any]] = field(default_factory=list)
    last_results: list[dict[str, Any]] = field(default_factory=list)
    scoring_waiting: int = 0
    """Complete studies whose scoring or commit failed and that the agent tries again."""
    scoring_waiting_studies: list[dict[str, Any]] = field(default_factory=list)
    scoring_waiting_as_of: str | None = None
    health: dict[str, Any] | None = None
    """The agent's last box-health reading (state_dir/health.json), None before its first."""
    scores: dict[str, Any] | None = None
    """The daily tallies (:func:`scores_section`): per finding, today's and the last 7 UTC
    days' studies, mean and median score, shares at or above the review and urgent
    thresholds; studies by triage level per UTC day. None: a database from before them."""

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["database"] = str(self.database)
        return out


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return (
        datetime.fromtimestamp(ts, timezone.utc)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


def _summary(payload: bytes) -> tuple[str | None, float | None, str | None]:
    """(top finding code, its score, narrative status) of a stored result."""
    try:
        body = json.loads(payload)
        findings = body.get("findings") or []
    except (ValueError, AttributeError):
        return None, None, None
    narrative = body.get("narrative_status")
    if not findings:
        return None, None, narrative
    best = max(findings, key=lambda f: f.get("score", 0.0))
    return best.get("code"), best.get("score"), narrative


def _file_id_key(db: sqlite3.Connection, layout: Layout) -> bytes | None:
    """The key the agent made file ids with (None: it has not made any yet)."""
    if not layout.has("meta"):
        return None
    row = db.execute("SELECT value FROM meta WHERE key = ?", (FILE_ID_KEY,)).fetchone()
    return bytes.fromhex(row[0]) if row else None


def find_file(database: Path, wanted: str) -> dict[str, Any] | None:
    """The file whose id (``P/rejected``'s ``file_id``) is ``wanted``: its path as recorded,
    status, reason and UIDs; None when no file recorded here has that id."""
    wanted = wanted.strip().lower()
    db = open_read_only(database)
    try:
        layout = Layout.of(db)
        key = _file_id_key(db, layout)
        if key is None or not is_file_id(wanted) or not layout.has("files"):
            return None
        found: dict[str, Any] | None = None
        for path, status, reason, sop, study, at in db.execute(
            "SELECT path, status, reason, sop_instance_uid, study_instance_uid, seen_at FROM files"
        ):
            if file_id(key, path) == wanted:
                found = {
                    "file_id": wanted,
                    "path": path,
                    "status": status,
                    "reason": reason,
                    "sop_instance_uid": sop,
                    "study_instance_uid": study,
                    "at": _iso(at),
                }
                break
        if found is not None and layout.has("instances"):
            # read, then rejected when its study was scored: that is what P/rejected said
            row = db.execute(
                "SELECT reason FROM instances WHERE path = ? AND state = 'rejected'",
                (found["path"],),
            ).fetchone()
            if row is not None:
                found.update(status="rejected", reason=row[0])
        return found
    finally:
        db.close()


def format_file(found: dict[str, Any]) -> str:
    lines = [
        f"file       {found['file_id']}",
        f"path       {found['path']}",
        f"status     {found['status']}" + (f": {found['reason']}" if found["reason"] else ""),
        f"seen       {found['at']}",
    ]
    if found["study_instance_uid"]:
        lines.append(f"study      {found['study_instance_uid']}")
    if found["sop_instance_uid"]:
        lines.append(f"instance   {found['sop_instance_uid']}")
    return "\n".join(escape_controls(line) for line in lines)


def read_status(database: Path, *, last: int = 5, now: float | None = None) -> StatusReport:
    """The report for the state database at ``database``. Raises ResourceMissing if absent."""
    now = time.time() if now is None else now
    db = open_read_only(database)
    try:
        layout = Layout.of(db)
        figures = report.read(db, layout)
        key = _file_id_key(db, layout)
        aside = report.set_aside(db, layout, last)
        rejected = report.last_rejected(db, layout, last)
        results = report.last_results(db, layout, last)
        recent = tallies.recent(db, now) if tallies.has_tallies(layout) else None
    finally:
        db.close()
    status = StatusReport(
        database=database,
        studies=figures.studies,
        outbox=figures.outbox,
        outbox_urgent=figures.outbox_urgent,
        outbox_oldest_seconds=figures.outbox_oldest_seconds(now),
        outbox_set_aside=figures.outbox_set_aside,
        set_aside=[
            {"id": i, "topic": topic, "at": _iso(at), "reason": reason}
            for i, topic, at, reason in aside
        ],
        mqtt_last_error=figures.mqtt_last_error,
        pacs_outbox=figures.pacs_outbox,
        pacs_failing=figures.pacs_failing,
        pacs_oldest_seconds=None
        if figures.pacs_oldest_at is None
        else max(0.0, now - figures.pacs_oldest_at),
        pacs_last_error=figures.pacs_last_error,
        alerts_waiting=figures.alerts_waiting,
        narratives_pending=figures.narratives_pending,
        counters=figures.counters,
        rejected=figures.files.get("rejected", 0),
        results_by_level=figures.results_by_level,
        last_rejected=[
            {
                "at": _iso(at),
                "file_id": file_id(key, path) if key is not None else None,
                "path": path,
                "reason": reason,
            }
            for path, reason, at in rejected
        ],
        health=read_health_file(database.parent / HEALTH_FILE, now),
        scores=None if recent is None else scores_section(recent),
    )
    for uid, revision, triage, payload, created, modality in results:
        code, score, narrative = _summary(payload)
        status.last_results.append(
            {
                "at": _iso(created),
                "study_instance_uid": uid,
                "revision": revision,
                "modality": modality,
                "triage": triage,
                "top_finding": code,
                "top_score": score,
                "narrative": narrative,
            }
        )
    waiting = read_waiting(database.parent)
    if waiting is not None and waiting["scoring_waiting"]:
        studies = waiting.get("scoring_waiting_studies")
        status.scoring_waiting = waiting["scoring_waiting"]
        status.scoring_waiting_studies = studies if isinstance(studies, list) else []
        at = waiting.get("updated_at")
        status.scoring_waiting_as_of = _iso(at) if isinstance(at, int | float) else None
    return status


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def scores_section(recent: tallies.Recent) -> dict[str, Any]:
    """The ``scores`` of ``edge-agent status --json`` (README: "Watching the model")."""
    return {
        "day": recent.day,
        "model_sha256": recent.model,
        "findings": {
            code: {
                "today": recent.today[code].summary(),
                "last_7_days": recent.week[code].summary(),
            }
            for code in recent.week
        },
        "levels_by_day": [
            {
                "day": day,
                "studies": sum(levels.values()),
                **levels,
                "urgent_share": _share(levels["urgent"], sum(levels.values())),
                "review_share": _share(levels["review"], sum(levels.values())),
            }
            for day, levels in recent.levels.items()
        ],
    }


def _percent(share: Any) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def _summary_text(s: dict[str, Any]) -> str:
    if not s["studies"]:
        return "n 0"
    return (
        f"n {s['studies']}, mean {s['mean_score']:.2f}, median {s['median_score']:.2f}, "
        f">=review {_percent(s['over_review_share'])}, "
        f">=urgent {_percent(s['over_urgent_share'])}"
    )


def format_scores(scores: dict[str, Any]) -> list[str]:
    """The lines of the daily tallies: per finding today and the last 7 days; studies by
    level per day."""
    model = scores["model_sha256"]
    lines = [
        f"scores     UTC day {scores['day']}, model {model[:12] if model else '-'}: per "
        "finding, today and the last 7 days (each study once, at its first result)"
    ]
    for code, f in scores["findings"].items():
        lines.append(f"  {code:<20} today   {_summary_text(f['today'])}")
        lines.append(f"  {'':<20} 7 days  {_summary_text(f['last_7_days'])}")
    if not scores["findings"]:
        lines.append("  no study scored in the last 7 days")
    if not any(d["studies"] for d in scores["levels_by_day"]):
        lines.append("levels     no study in the last 7 UTC days")
        return lines
    lines.append("levels     studies per UTC day: urgent and review shares")
    for d in scores["levels_by_day"]:
        if d["studies"]:
            lines.append(
                f"  {d['day']}  n {d['studies']}: urgent {d['urgent']} "
                f"({_percent(d['urgent_share'])}), review {d['review']} "
                f"({_percent(d['review_share'])}), routine {d['routine']}, "
                f"not_scored {d['not_scored']}"
            )
        else:
            lines.append(f"  {d['day']}  n 0")
    return lines


def format_status(report: StatusReport) -> str:
    s = report.studies
    lines = [
        f"state      {report.database}",
        f"studies    open {s.get('open', 0)}, complete (waiting to be scored) "
        f"{s.get('complete', 0)}, scored {s.get('scored', 0)}",
    ]
    age = (
        f", oldest {report.outbox_oldest_seconds:.0f} s"
        if report.outbox_oldest_seconds is not None
        else ""
    )
    lines.append(
        f"outbox     {report.outbox} message(s) waiting for the broker"
        f"{age}; urgent among them {report.outbox_urgent}"
    )
    if report.scoring_waiting:
        lines.append(
            f"scoring    {report.scoring_waiting} complete stud(ies) waiting to be stored "
            f"again (as of {report.scoring_waiting_as_of})"
        )
        for w in report.scoring_waiting_studies:
            if isinstance(w, dict):
                lines.append(
                    f"  {w.get('study_instance_uid')}: {w.get('reason')}; attempts "
                    f"{w.get('attempts')}, next in {w.get('retry_in_s')} s"
                )
    if report.outbox_set_aside:
        lines.append(
            f"set aside  {report.outbox_set_aside} message(s) the broker did not take, kept "
            "and tried again later (mqtt.set_aside_retry_seconds)"
        )
    for r in report.set_aside:  # topic and reason may hold what broke delivery: escaped
        lines.append(
            f"  {r['at']}  #{r['id']} {printable(r['topic'], 120)}: "
            f"{printable(r['reason'] or '', 200)}"
        )
    if report.mqtt_last_error:
        lines.append(f"mqtt       last problem: {printable(report.mqtt_last_error, 300)}")
    if report.pacs_outbox is not None and (report.pacs_outbox or report.pacs_last_error):
        age = (
            f", oldest {report.pacs_oldest_seconds:.0f} s"
            if report.pacs_oldest_seconds is not None
            else ""
        )
        lines.append(
            f"pacs       {report.pacs_outbox} SR(s) waiting for the PACS{age}; "
            f"{report.pacs_failing} after a failed attempt"
        )
    if report.pacs_last_error:
        lines.append(f"pacs       last problem: {printable(report.pacs_last_error, 300)}")
    lines.append(f"alerts     {report.alerts_waiting} urgent result(s) not acknowledged yet")
    c = report.counters
    if any(k.startswith("acks_") for k in c):
        lines.append(
            f"acks       {c.get('acks_received', 0)} received, {c.get('acks_unknown', 0)} "
            f"for no urgent alert of this agent, {c.get('acks_refused', 0)} malformed or "
            "over-size (ignored)"
        )
    if report.narratives_pending or any(k.startswith("narrative_") for k in c):
        lines.append(
            f"narratives {report.narratives_pending or 0} being written; written "
            f"{c.get('narrative_ok', 0)}, timed out {c.get('narrative_timeout', 0)}, "
            f"failed {c.get('narrative_failed', 0)}"
        )
    if report.counters:
        lines.append(
            "counters   " + ", ".join(f"{k} {v}" for k, v in sorted(report.counters.items()))
        )
    if report.health is not None:
        lines.extend(format_health(report.health))
    if report.scores is not None:
        lines.extend(format_scores(report.scores))
    lines.append(f"rejected   {report.rejected} file(s)")
    for r in report.last_rejected:
        lines.append(f"  {r['at']}  {r['file_id'] or '-'}  {r['path']}: {r['reason']}")
    lines.append("last results" if report.last_results else "last results: none yet")
    for r in report.last_results:
        top = (
            f"{r['top_finding']} {r['top_score']:.2f}"
            if r["top_finding"] is not None and r["top_score"] is not None
            else ""
        )
        narrative = f"  narrative {r['narrative']}" if r.get("narrative") else ""
        lines.append(
            f"  {r['at']}  {r['triage']:<10} {r['modality']:<3} rev {r['revision']}  "
            f"{r['study_instance_uid']}  {top}{narrative}".rstrip()
        )
    # Paths, reasons, UIDs and modalities came from files: shown, never obeyed.
    return "\n".join(escape_controls(line) for line in lines)


def _figure(value: Any, unit: str, digits: int = 0) -> str:
    return "?" if not isinstance(value, int | float) else f"{value:.{digits}f}{unit}"


def format_health(h: dict[str, Any]) -> list[str]:
    """The box's health lines of ``edge-agent status``: readings the box does not have are
    left out; warnings (and a paused intake) come first."""
    age = h.get("age_seconds")
    when = f"read {age:.0f} s ago" if isinstance(age, int | float) else "read at an unknown time"
    if h.get("stale"):
        when += " (stale: is the agent running?)"
    lines = []
    if h.get("intake_paused"):
        lines.append(f"INTAKE     {h['intake_paused']}")
    lines.extend(f"WARNING    {w}" for w in h.get("warnings") or [])
    parts = []
    if h.get("soc_temp_c") is not None or h.get("gpu_temp_c") is not None:
        soc, gpu = _figure(h.get("soc_temp_c"), " °C", 1), _figure(h.get("gpu_temp_c"), " °C", 1)
        parts.append(f"SoC {soc}, GPU {gpu}")
    if h.get("cpu_mhz") is not None:
        capped = " (capped)" if h.get("cpu_capped") else ""
        parts.append(
            f"CPU {_figure(h.get('cpu_mhz'), '')}/{_figure(h.get('cpu_max_mhz'), ' MHz')}{capped}"
        )
    if h.get("gpu_mhz") is not None:
        parts.append(f"GPU {_figure(h.get('gpu_mhz'), '')}/{_figure(h.get('gpu_max_mhz'), ' MHz')}")
    if h.get("power_mode") is not None:
        parts.append(f"power mode {h['power_mode']}")
    events = h.get("overcurrent_events")
    if isinstance(events, dict):
        parts.append("over-current events " + ", ".join(f"{k} {v}" for k, v in events.items()))
    lines.append(f"health     {when}" + (f": {'; '.join(parts)}" if parts else ""))
    lines.append(
        f"space      state disk {_figure(h.get('state_free_mib'), ' MiB')} free "
        f"({_figure(h.get('state_free_percent'), '%', 1)}), watch disk "
        f"{_figure(h.get('watch_free_mib'), ' MiB')} free "
        f"({_figure(h.get('watch_free_percent'), '%', 1)}); memory available "
        f"{_figure(h.get('memory_available_mib'), ' MiB')}"
    )
    return lines
