"""The daily tallies (``tally_*`` tables): written by the real Store in the transaction that
stores a result, each study counted once, on the UTC day of its first result; a commit
rolled back counts nothing; bounded; no UIDs. (The migration from schema 5 is tested in
test_state.py, the daemon's in test_monitor_daemon.py.)"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from helpers.delivery import SHA, UID, Injector, make_result
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.histogram import FINE_BINS, REPORT_BINS, coarsen, fine_bin, quantile
from edge_agent.results import TRIAGE_LEVELS, FindingResult, StudyResult, iso
from edge_agent.state import tallies
from edge_agent.store import InstanceRecord, Message, NarrativeJob, Store

DAY = 86400.0
T0 = 20_000 * DAY + 3600.0  # 2024-10-04 01:00 UTC


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state" / "state.sqlite3")
    yield s
    s.close()


def read(store: Store, since: str | None = None) -> tallies.Tallies:
    return tallies.read(store._conn(), since)


def day(ts: float) -> str:
    return tallies.utc_day(ts)


def levels(**counts: int) -> dict[str, int]:
    return {level: counts.get(level, 0) for level in TRIAGE_LEVELS}


def test_each_study_is_counted_once_on_the_utc_day_of_its_first_result(store: Store) -> None:
    inject = Injector(store)
    inject.result(f"{UID}.1", "urgent", now=T0)
    inject.result(f"{UID}.2", "routine", now=T0 + 60)
    inject.result(f"{UID}.3", "not_scored", now=T0 + 120)
    inject.result(f"{UID}.4", "review", now=T0 + DAY)  # the next UTC day
    got = read(store)
    assert got.model == SHA
    assert got.levels_by_day() == {
        day(T0): {"urgent": 1, "review": 0, "routine": 1, "not_scored": 1},
        day(T0 + DAY): {"urgent": 0, "review": 1, "routine": 0, "not_scored": 0},
    }
    first = got.finding(SHA, "pneumothorax", [day(T0)])
    assert (first.studies, first.flagged, first.urgent) == (2, 1, 1)  # not_scored: no scores
    assert first.score_sum == pytest.approx(0.93 + 0.05)
    assert first.bins[fine_bin(0.93)] == first.bins[fine_bin(0.05)] == 1 == sum(first.bins) - 1
    both = got.finding(SHA, "pneumothorax")
    assert both.summary() == {
        "studies": 3,
        "mean_score": round((0.93 + 0.05 + 0.45) / 3, 4),
        "median_score": pytest.approx(0.45, abs=0.01),
        "over_review_share": round(2 / 3, 4),
        "over_urgent_share": round(1 / 3, 4),
    }


def test_a_later_revision_of_a_study_is_not_counted_again(store: Store) -> None:
    """A late image re-opens the study: revision 2 is scored and published, not counted."""
    inject = Injector(store)
    inject.result(UID, "routine", now=T0)
    second = inject.result(UID, "urgent", now=T0 + DAY)
    assert second.revision == 2
    got = read(store)
    assert got.levels_by_day() == {
        day(T0): {"urgent": 0, "review": 0, "routine": 1, "not_scored": 0}
    }
    assert got.finding(SHA, "pneumothorax").studies == 1


def test_a_narrative_revision_is_not_counted_again(store: Store) -> None:
    record = InstanceRecord(f"{UID}.1", UID, None, "CR", "frontal")
    store.add_instance("a.dcm", 1, 1, record, T0)
    store.complete_quiet_studies(0.0, T0)
    study = store.study(UID)
    assert study is not None
    flag = make_result(UID, 1, "urgent").model_copy(update={"narrative_status": "pending"})
    message = Message("result", f"p/study/{UID}", flag.to_json_bytes(), flag.alert_id)
    job = NarrativeJob(flag.alert_id, UID, 1, "{}", time.time() + 60)
    assert store.commit_result(study, "urgent", message, {}, [], T0, job)

    def timed_out(result: StudyResult, revision: int, alert: str) -> StudyResult:
        return result.with_narrative(
            revision=revision, alert_id=alert, status="timeout", published_at=iso(T0)
        )

    assert store.commit_narrative(job, f"p/study/{UID}", timed_out, T0 + 10) == 2
    assert read(store).levels_by_day()[day(T0)]["urgent"] == 1
    assert read(store).finding(SHA, "pneumothorax").studies == 1


def commit(store: Store, uid: str, now: float) -> bool:
    record = InstanceRecord(f"{uid}.1", uid, None, "CR", "frontal")
    store.add_instance(f"{uid}.dcm", 1, 1, record, now)
    store.complete_quiet_studies(0.0, now)
    study = store.study(uid)
    assert study is not None
    result = make_result(uid, study.revision, "urgent")
    message = Message("result", f"p/study/{uid}", result.to_json_bytes(), result.alert_id)
    return store.commit_result(study, "urgent", message, {f"{uid}.1": ("scored", None)}, [], now)


def test_a_commit_that_fails_counts_nothing_and_its_retry_counts_once(store: Store) -> None:
    """The count is in the result's transaction: a failure after it (here the outbox write,
    made to fail by SQLite itself) rolls it back with the result; the scoring thread's retry
    then counts the study once, and a commit repeated after it (a crash before the thread
    heard) changes nothing."""
    conn = store._conn()
    conn.execute(
        "CREATE TEMP TRIGGER full BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'full'); END"
    )
    with pytest.raises(sqlite3.IntegrityError):
        commit(store, UID, T0)
    assert read(store).levels == {} and read(store).findings == {}
    assert conn.execute("SELECT COUNT(*) FROM results").fetchone() == (0,)
    conn.execute("DROP TRIGGER full")
    assert commit(store, UID, T0 + 5)
    assert not commit(store, UID, T0 + 6)  # the same revision again: nothing more
    assert read(store).levels_by_day() == {
        day(T0): {"urgent": 1, "review": 0, "routine": 0, "not_scored": 0}
    }
    assert read(store).finding(SHA, "pneumothorax").studies == 1


def test_only_the_newest_kept_days_stay(store: Store) -> None:
    """One result a day for KEEP_DAYS + 1 days: the first day goes, from every table."""
    inject = Injector(store)
    for i in range(tallies.KEEP_DAYS + 1):
        inject.result(f"{UID}.{i}", "urgent", now=T0 + i * DAY)
    kept = read(store)
    assert len(kept.levels_by_day()) == tallies.KEEP_DAYS
    assert day(T0) not in kept.levels_by_day() and day(T0 + DAY) in kept.levels_by_day()
    assert day(T0) not in kept.findings[SHA]["pneumothorax"]
    bins = store._conn().execute("SELECT COUNT(*) FROM tally_bins WHERE day = ?", (day(T0),))
    assert bins.fetchone() == (0,)


def test_a_clock_set_years_ahead_once_deletes_nothing(store: Store) -> None:
    """Kept are the newest days holding a result, not the days near the clock's now."""
    inject = Injector(store)
    inject.result(f"{UID}.1", "urgent", now=T0)
    inject.result(f"{UID}.2", "urgent", now=T0 + 3650 * DAY)  # a flat RTC battery, say
    inject.result(f"{UID}.3", "routine", now=T0 + DAY)  # the clock right again
    assert len(read(store).levels_by_day()) == 3


def test_the_tallies_hold_no_uid_and_no_patient_data(store: Store) -> None:
    inject = Injector(store)
    for i, level in enumerate(("urgent", "review", "routine", "not_scored")):
        inject.result(f"{UID}.{i}", level, now=T0 + i)
    conn = store._conn()
    values = []
    for table in ("tally_levels", "tally_findings", "tally_bins"):
        values += [v for row in conn.execute(f"SELECT * FROM {table}") for v in row]
    text = json.dumps(values)
    assert UID not in text and "1.2.826" not in text
    assert {type(v) for v in values} <= {str, int, float}
    strings = {v for v in values if isinstance(v, str)}
    assert strings <= {SHA, "pneumothorax", "urgent", "review", "routine", "not_scored", day(T0)}


def test_a_foreign_or_damaged_payload_counts_its_level_only(store: Store) -> None:
    for i, payload in enumerate((b"not json", b"[1]", b'{"findings": [{"code": 1}]}')):
        uid = f"{UID}.{i}"
        store.add_instance(
            f"{i}.dcm", 1, 1, InstanceRecord(f"{uid}.1", uid, None, "CR", "frontal"), T0
        )
        store.complete_quiet_studies(0.0, T0)
        study = store.study(uid)
        assert study is not None
        message = Message("result", f"p/study/{uid}", payload, f"alert-{i}")
        assert store.commit_result(study, "routine", message, {}, [], T0)
    got = read(store)
    assert got.levels == {"": {day(T0): {"routine": 3}}} and got.findings == {}
    assert got.model is None


# -- the scores read from a payload ---------------------------------------------------------

finite = st.one_of(st.floats(min_value=-2.0, max_value=2.0), st.just(float("nan")))


@given(score=finite, review=st.one_of(st.none(), finite), urgent=st.one_of(st.none(), finite))
def test_scores_of_a_payload_follow_the_triage_rule(
    score: float, review: float | None, urgent: float | None
) -> None:
    payload = json.dumps(
        {
            "model": {"sha256": SHA},
            "findings": [
                {
                    "code": "x",
                    "score": score,
                    "review_threshold": review,
                    "urgent_threshold": urgent,
                }
            ],
        }
    ).encode()
    got = tallies.scores_of(payload)
    if not 0.0 <= score <= 1.0:
        assert got.findings == ()
        return
    (f,) = got.findings
    assert f.flagged == (review is not None and score >= review)
    assert f.urgent == (urgent is not None and score >= urgent)


def test_the_payload_flag_is_the_one_the_result_published() -> None:
    """``flagged`` as published wins: it is what the receivers saw."""
    finding = FindingResult(
        code="x", label="X", score=0.5, urgent_threshold=None, review_threshold=0.4, flagged=True
    )
    result = make_result(UID, 1, "review").model_copy(update={"findings": [finding]})
    (f,) = tallies.scores_of(result.to_json_bytes()).findings
    assert (f.code, f.score, f.flagged, f.urgent) == ("x", 0.5, True, False)


# -- the shared bins ------------------------------------------------------------------------


@given(st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=50))
def test_report_bins_are_sums_of_fine_bins(scores: list[float]) -> None:
    fine = [0] * FINE_BINS
    for s in scores:
        fine[fine_bin(s)] += 1
    coarse = coarsen(fine, REPORT_BINS)
    assert sum(coarse) == len(scores) and len(coarse) == REPORT_BINS
    for s in scores:  # each score in the coarse bin its value says (up to float rounding)
        i = fine_bin(s) // (FINE_BINS // REPORT_BINS)
        assert i / REPORT_BINS - 1e-9 <= s <= (i + 1) / REPORT_BINS + 1e-9
    if scores:
        median = quantile(fine, 0.5)
        assert median is not None
        ordered = sorted(scores)
        low, high = ordered[(len(ordered) - 1) // 2], ordered[len(ordered) // 2]
        assert low - 1 / FINE_BINS - 1e-9 <= median <= high + 1 / FINE_BINS + 1e-9


def test_a_bin_count_that_is_not_a_divisor_is_refused() -> None:
    with pytest.raises(ValueError, match="not a divisor"):
        coarsen([0] * FINE_BINS, 30)


@pytest.mark.parametrize(
    ("score", "expected"),
    [(0.0, 0), (0.01, 0), (0.0100001, 1), (0.29, 28), (0.3, 29), (0.999, 99), (1.0, 99)],
)
def test_fine_bins_are_closed_on_the_right_whatever_the_float_rounding(
    score: float, expected: int
) -> None:
    """As Prometheus' ``le``; 0.29 * 100 is 28.999999999999996 in floating point."""
    assert fine_bin(score) == expected
