"""Daily tallies of the results, for watching a model after go-live (``tally_levels``,
``tally_findings``, ``tally_bins``): ``edge-agent status``, ``/metrics`` and
``edge-export evaluate --drift`` read them. They hold a day, a model's sha256, a finding
code, a score bin and counts: no UID, nothing about a patient.

**What is counted.** Each study once, at its first result (the first the agent stored for
it), on the UTC day that result was committed (``YYYY-MM-DD``; UTC, not the site's day, so
that a box's days do not depend on its time zone and agree with ``--drift``'s), with that
result's triage level and, per finding, its score (in its fine bin,
:mod:`edge_agent.histogram`), whether it reached the review threshold (``flagged``) and the
urgent one. A later revision of the study (a late image re-opened it, or its draft narrative
was added) is not counted again: the tallies describe what the box first said about each
study, one score per study as in the validation report, and a study scored twice does not
weigh twice.

**Exactly once.** :func:`count_first` runs in the transaction that stores the result
(:meth:`edge_agent.store.Store.commit_result`): a crash leaves both the result and its count
or neither, and a result stored before a crash is not counted again when its commit is
repeated (the result is there: it is not the study's first any more).

**Bounded.** One row per day, model and level; per day, model and finding; per day, model,
finding and fine bin holding a score; and at most :data:`KEEP_DAYS` days: when a result
opens a new day, the days older than the newest KEEP_DAYS that hold a result are deleted,
in the same transaction. Newest by their date, not by the clock's distance from now: a
clock set years ahead once (a flat RTC battery) adds one day, and cannot wipe the others.

The schema 5 -> 6 migration counts the results stored before (:func:`backfill`), so the
tallies of an upgraded box start with its history.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from ..histogram import FINE_BINS, fine_bin, quantile
from ..results import TRIAGE_LEVELS, reaches

if TYPE_CHECKING:  # schema imports this module (its migration 5 -> 6 is :func:`backfill`)
    from .schema import Layout

KEEP_DAYS = 400
"""Days of tallies kept, the newest holding a result (over a year: a season can be
compared with last year's)."""

MODEL_KEY = "tally_model"
"""``meta`` key: the model sha256 of the last result counted (the figures of status and
/metrics are that model's; another model's scores are another distribution)."""


@dataclass(frozen=True)
class FindingScore:
    code: str
    score: float
    flagged: bool
    """At or above the finding's review threshold."""
    urgent: bool
    """At or above its urgent threshold."""


@dataclass(frozen=True)
class Scores:
    """What a result's tally needs of its payload (model '' when it could not be read)."""

    model_sha256: str
    findings: tuple[FindingScore, ...]


def scores_of(payload: bytes | str) -> Scores:
    """The model and per-finding scores of a stored result's payload (tolerant: a finding
    without a code or a score in [0, 1] is left out; an unreadable payload has none)."""
    try:
        body = json.loads(payload)
        model = body.get("model")
        sha = model.get("sha256") if isinstance(model, dict) else None
        findings = body.get("findings") or []
    except (ValueError, AttributeError):
        return Scores("", ())
    out = []
    for f in findings if isinstance(findings, list) else []:
        if not isinstance(f, dict):
            continue
        code, score = f.get("code"), _number(f.get("score"))
        if not isinstance(code, str) or score is None or not 0.0 <= score <= 1.0:
            continue  # NaN fails the range too
        flagged = f.get("flagged")
        if not isinstance(flagged, bool):  # older or foreign payloads: the same rule
            flagged = reaches(score, _number(f.get("review_threshold")))
        urgent = reaches(score, _number(f.get("urgent_threshold")))
        out.append(FindingScore(code, score, flagged, urgent))
    return Scores(sha if isinstance(sha, str) else "", tuple(out))


def _number(x: object) -> float | None:
    """``x`` as a float when it is a JSON number (not a bool), else None."""
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def utc_day(ts: float) -> str:
    """The UTC day of Unix time ``ts``, ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(ts, timezone.utc).date().isoformat()


# -- writing (in the caller's transaction) --------------------------------------------------


def count_first(
    conn: sqlite3.Connection,
    study_instance_uid: str,
    alert_id: str,
    triage: str,
    payload: bytes,
    at: float,
) -> bool:
    """Count the result ``alert_id`` (just stored, at ``at``) if it is its study's first;
    True when it was counted.

    The scores are read from ``payload``, the bytes stored and published: the tallies count
    what the receivers were told, and the migration (:func:`backfill`) and ``--drift`` on an
    older database count the same bytes the same way.
    """
    other = conn.execute(
        "SELECT 1 FROM results WHERE study_instance_uid = ? AND alert_id != ? LIMIT 1",
        (study_instance_uid, alert_id),
    ).fetchone()
    if other is not None:
        return False
    day = utc_day(at)
    new_day = conn.execute("SELECT 1 FROM tally_levels WHERE day = ? LIMIT 1", (day,)).fetchone()
    _add(conn, day, triage, scores_of(payload))
    if new_day is None:
        _prune(conn)
    return True


def _prune(conn: sqlite3.Connection) -> None:
    """Delete the days older than the newest KEEP_DAYS that hold a result."""
    row = conn.execute(
        "SELECT day FROM (SELECT DISTINCT day FROM tally_levels ORDER BY day DESC) "
        "LIMIT 1 OFFSET ?",
        (KEEP_DAYS - 1,),
    ).fetchone()
    if row is None:
        return
    for table in ("tally_levels", "tally_findings", "tally_bins"):
        conn.execute(f"DELETE FROM {table} WHERE day < ?", (row[0],))  # names from this list


def _add(conn: sqlite3.Connection, day: str, triage: str, scores: Scores) -> None:
    model = scores.model_sha256
    conn.execute(
        "INSERT INTO tally_levels (day, model_sha256, triage, studies) VALUES (?, ?, ?, 1) "
        "ON CONFLICT (day, model_sha256, triage) DO UPDATE SET studies = studies + 1",
        (day, model, triage),
    )
    for f in scores.findings:
        conn.execute(
            "INSERT INTO tally_findings "
            "(day, model_sha256, finding, studies, flagged, urgent, score_sum) "
            "VALUES (?, ?, ?, 1, ?, ?, ?) ON CONFLICT (day, model_sha256, finding) DO UPDATE "
            "SET studies = studies + 1, flagged = flagged + excluded.flagged, "
            "urgent = urgent + excluded.urgent, score_sum = score_sum + excluded.score_sum",
            (day, model, f.code, int(f.flagged), int(f.urgent), f.score),
        )
        conn.execute(
            "INSERT INTO tally_bins (day, model_sha256, finding, bin, studies) "
            "VALUES (?, ?, ?, ?, 1) ON CONFLICT (day, model_sha256, finding, bin) "
            "DO UPDATE SET studies = studies + 1",
            (day, model, f.code, fine_bin(f.score)),
        )
    if model:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (MODEL_KEY, model))


def backfill(source: sqlite3.Connection, target: sqlite3.Connection | None = None) -> int:
    """Count the first result of each study stored in ``source``'s ``results`` into
    ``target``'s tallies (default: ``source``'s own), oldest first; returns how many were
    counted. The schema 5 -> 6 migration runs it; ``--drift`` on a database of an older
    agent runs it into a database in memory, so both read the tallies one way."""
    rows = source.execute(
        "SELECT r.triage, r.payload, r.created_at FROM results r "
        "WHERE NOT EXISTS (SELECT 1 FROM results o WHERE o.study_instance_uid = "
        "r.study_instance_uid AND (o.revision < r.revision OR (o.revision = r.revision "
        "AND o.created_at < r.created_at))) ORDER BY r.created_at"
    ).fetchall()
    into = source if target is None else target
    for triage, payload, created_at in rows:
        _add(into, utc_day(float(created_at)), str(triage), scores_of(payload))
    return len(rows)


# -- reading --------------------------------------------------------------------------------


@dataclass
class FindingTally:
    """A finding's studies over some days (one model)."""

    studies: int = 0
    flagged: int = 0
    urgent: int = 0
    score_sum: float = 0.0
    bins: list[int] = field(default_factory=lambda: [0] * FINE_BINS)
    """Studies per fine bin (:mod:`edge_agent.histogram`)."""

    def add(self, other: FindingTally) -> None:
        self.studies += other.studies
        self.flagged += other.flagged
        self.urgent += other.urgent
        self.score_sum += other.score_sum
        self.bins = [a + b for a, b in zip(self.bins, other.bins, strict=True)]

    def summary(self) -> dict[str, float | int | None]:
        """Studies, mean and median score, shares at or above the review and urgent
        thresholds (None where there is no study)."""
        n = self.studies
        return {
            "studies": n,
            "mean_score": round(self.score_sum / n, 4) if n else None,
            "median_score": quantile(self.bins, 0.5),
            "over_review_share": round(self.flagged / n, 4) if n else None,
            "over_urgent_share": round(self.urgent / n, 4) if n else None,
        }


@dataclass(frozen=True)
class Tallies:
    """The tallies of some days, as read in one transaction."""

    levels: dict[str, dict[str, dict[str, int]]]
    """model sha256 -> UTC day -> triage level -> studies."""
    findings: dict[str, dict[str, dict[str, FindingTally]]]
    """model sha256 -> finding code -> UTC day -> its tally."""
    model: str | None
    """The model of the last result counted (None: nothing counted yet)."""

    def levels_by_day(self) -> dict[str, dict[str, int]]:
        """UTC day -> level -> studies, all models together."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(TRIAGE_LEVELS, 0))
        for days in self.levels.values():
            for day, levels in days.items():
                for level, n in levels.items():
                    out[day][level] = out[day].get(level, 0) + n
        return dict(sorted(out.items()))

    def finding(self, model: str, code: str, days: Iterable[str] | None = None) -> FindingTally:
        """One finding's tally for ``model`` over ``days`` (default: every day read)."""
        total = FindingTally()
        per_day = self.findings.get(model, {}).get(code, {})
        for day in per_day if days is None else days:
            if day in per_day:
                total.add(per_day[day])
        return total


def has_tallies(layout: Layout) -> bool:
    """The database keeps tallies (schema 6 or later)."""
    return layout.has("tally_levels") and layout.has("tally_findings") and layout.has("tally_bins")


def read(conn: sqlite3.Connection, since: str | None = None) -> Tallies:
    """The tallies of the UTC days from ``since`` on (default: every day kept), read in one
    transaction (``conn`` not in one already)."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        return _read(conn, since or "")
    finally:
        if own:
            conn.execute("COMMIT")


def _read(conn: sqlite3.Connection, since: str) -> Tallies:
    levels: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    for day, model, triage, n in conn.execute(
        "SELECT day, model_sha256, triage, studies FROM tally_levels WHERE day >= ?", (since,)
    ):
        levels[model][day][triage] = int(n)
    findings: dict[str, dict[str, dict[str, FindingTally]]] = defaultdict(lambda: defaultdict(dict))
    for day, model, code, n, flagged, urgent, total in conn.execute(
        "SELECT day, model_sha256, finding, studies, flagged, urgent, score_sum "
        "FROM tally_findings WHERE day >= ?",
        (since,),
    ):
        findings[model][code][day] = FindingTally(int(n), int(flagged), int(urgent), float(total))
    for day, model, code, b, n in conn.execute(
        "SELECT day, model_sha256, finding, bin, studies FROM tally_bins WHERE day >= ?",
        (since,),
    ):
        tally = findings[model][code].get(day)
        if tally is not None and 0 <= int(b) < FINE_BINS:
            tally.bins[int(b)] += int(n)
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (MODEL_KEY,)).fetchone()
    return Tallies(
        {m: dict(d) for m, d in levels.items()},
        {m: dict(c) for m, c in findings.items()},
        None if row is None else str(row[0]),
    )


def window(now: float, days: int) -> list[str]:
    """The ``days`` UTC days ending with ``now``'s, oldest first."""
    today = datetime.fromtimestamp(now, timezone.utc).date()
    return [(today - timedelta(days=days - 1 - i)).isoformat() for i in range(days)]


WINDOW_DAYS = 7
"""The days ``edge-agent status`` and ``/metrics`` sum over besides today (today included)."""


@dataclass(frozen=True)
class Recent:
    """The tallies status and /metrics show: today's and the last WINDOW_DAYS UTC days'."""

    day: str
    """Today, UTC (``YYYY-MM-DD``)."""
    model: str | None
    """The model of the last result counted; the findings' figures are its own."""
    today: dict[str, FindingTally]
    """Finding code -> today's tally."""
    week: dict[str, FindingTally]
    """Finding code -> the tally of the last WINDOW_DAYS days."""
    levels: dict[str, dict[str, int]]
    """UTC day -> triage level -> studies, every one of the WINDOW_DAYS days (oldest
    first, zeros where none), all models together."""

    def level_totals(self, days: Iterable[str]) -> dict[str, int]:
        return {level: sum(self.levels[d][level] for d in days) for level in TRIAGE_LEVELS}


def recent(conn: sqlite3.Connection, now: float, days: int = WINDOW_DAYS) -> Recent:
    """Today's and the last ``days`` UTC days' tallies at ``now`` (one read transaction)."""
    span = window(now, days)
    kept = read(conn, span[0])
    today = span[-1]
    model = kept.model
    codes = sorted(kept.findings.get(model, {})) if model is not None else []
    by_day = kept.levels_by_day()
    return Recent(
        day=today,
        model=model,
        today={c: kept.finding(model, c, [today]) for c in codes if model is not None},
        week={c: kept.finding(model, c, span) for c in codes if model is not None},
        levels={d: by_day.get(d, dict.fromkeys(TRIAGE_LEVELS, 0)) for d in span},
    )
