"""The state database: every step atomic, nothing lost across a reopen."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.store import InstanceRecord, Message, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state.sqlite3")
    yield s
    s.close()


def inst(sop: str, study: str = "1.2.3", view: str = "frontal") -> InstanceRecord:
    return InstanceRecord(sop, study, "1.2.3.4", "CR", view)  # type: ignore[arg-type]


def result_msg(alert: str) -> Message:
    return Message("result", "p/study/1.2.3", b'{"a":1}', alert)


def test_instance_opens_study_and_duplicate_changes_nothing(store: Store) -> None:
    assert store.add_instance("a.dcm", 10, 1, inst("1.1"), now=100.0) == "accepted"
    assert store.add_instance("copy.dcm", 10, 1, inst("1.1"), now=101.0) == "duplicate"
    study = store.study("1.2.3")
    assert study is not None
    assert (study.state, study.revision, study.last_instance_at) == ("open", 1, 100.0)
    assert len(store.instances("1.2.3")) == 1
    assert set(store.file_signatures()) == {"a.dcm", "copy.dcm"}


def test_quiet_period_completes_study(store: Store) -> None:
    store.add_instance("a.dcm", 10, 1, inst("1.1"), now=100.0)
    store.add_instance("b.dcm", 10, 1, inst("1.2"), now=105.0)
    assert store.complete_quiet_studies(10.0, now=114.9) == []
    assert store.complete_quiet_studies(10.0, now=115.0) == ["1.2.3"]
    assert store.study("1.2.3").state == "complete"  # type: ignore[union-attr]
    assert store.studies_in_state("complete") == ["1.2.3"]


def test_result_commit_is_atomic_with_outbox(store: Store) -> None:
    store.add_instance("a.dcm", 10, 1, inst("1.1"), now=100.0)
    store.complete_quiet_studies(1.0, now=200.0)
    study = store.study("1.2.3")
    assert study is not None
    ok = store.commit_result(
        study, "urgent", result_msg("A1"), {"1.1": ("scored", None)}, [], 201.0
    )
    assert ok
    assert store.study("1.2.3").state == "scored"  # type: ignore[union-attr]
    pending = store.outbox_pending(10, ())
    assert [m.payload for m in pending] == [b'{"a":1}']
    assert store.instances("1.2.3")[0].state == "scored"


def test_instance_arriving_while_scoring_invalidates_the_result(store: Store) -> None:
    store.add_instance("a.dcm", 10, 1, inst("1.1"), now=100.0)
    store.complete_quiet_studies(1.0, now=200.0)
    snapshot = store.study("1.2.3")
    assert snapshot is not None
    store.add_instance("b.dcm", 10, 1, inst("1.2"), now=202.0)  # arrives during scoring
    assert not store.commit_result(snapshot, "routine", result_msg("A1"), {}, [], 203.0)
    assert store.outbox_depth() == 0
    study = store.study("1.2.3")
    assert study is not None and (study.state, study.revision) == ("open", 1)


def test_late_instance_after_scoring_opens_next_revision(store: Store) -> None:
    store.add_instance("a.dcm", 10, 1, inst("1.1"), now=100.0)
    store.complete_quiet_studies(1.0, now=200.0)
    store.commit_result(store.study("1.2.3"), "routine", result_msg("A1"), {}, [], 201.0)  # type: ignore[arg-type]
    store.add_instance("b.dcm", 10, 1, inst("1.2"), now=300.0)
    study = store.study("1.2.3")
    assert study is not None and (study.state, study.revision) == ("open", 2)


def test_outbox_leaves_only_on_delete_and_counts(store: Store) -> None:
    store.record_file(
        "bad.dcm",
        3,
        1,
        "rejected",
        "not DICOM",
        1.0,
        message=Message("rejected", "p/rejected", b"{}"),
    )
    store.add_instance("a.dcm", 10, 1, inst("1.1"), now=100.0)
    store.complete_quiet_studies(1.0, now=200.0)
    store.commit_result(store.study("1.2.3"), "routine", result_msg("A1"), {}, [], 201.0)  # type: ignore[arg-type]
    first, second = store.outbox_pending(10, ())
    assert first.id < second.id  # publication order is commit order
    assert store.outbox_pending(10, [first.id]) == [second]
    store.outbox_delete(second.id)
    store.outbox_delete(second.id)  # a second PUBACK for the same row is harmless
    assert store.outbox_depth() == 1
    counters = store.counters()
    assert counters["published"] == 1
    assert counters["rejected"] == 1
    assert counters["outbox_depth"] == 1


def test_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    s = Store(path)
    s.add_instance("a.dcm", 10, 1, inst("1.1"), now=100.0)
    s.complete_quiet_studies(1.0, now=200.0)
    s.close()
    again = Store(path)
    assert again.studies_in_state("complete") == ["1.2.3"]
    assert again.file_signatures() == {"a.dcm": (10, 1)}
    again.close()
