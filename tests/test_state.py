"""The state package without the narrative model: the alert state machine of a narrative
revision, the schema's history, and the one report behind ``P/status``, ``edge-agent
status`` and ``/metrics``. Nothing here needs torch (see the last test)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.delivery import SHA, Injector, make_result
from helpers.metrics import of_state
from helpers.old_state import as_schema

from edge_agent.results import StudyResult, alert_id, iso
from edge_agent.state import schema, tallies
from edge_agent.state.schema import Layout
from edge_agent.status import read_status
from edge_agent.store import InstanceRecord, Message, NarrativeJob, Store

UID = "1.2.826.0.1.3680043.10.14"
TOPIC = f"p/study/{UID}"


def flag_result() -> StudyResult:
    """An urgent result whose draft narrative is on the way."""
    return make_result(UID, 1, "urgent").model_copy(update={"narrative_status": "pending"})


def narrated(flag: StudyResult, revision: int, new_alert: str) -> StudyResult:
    """What the narrative worker builds when its model timed out (no model needed)."""
    return flag.with_narrative(
        revision=revision, alert_id=new_alert, status="timeout", published_at=iso(time.time())
    )


@pytest.fixture
def flagged(tmp_path: Path) -> tuple[Store, NarrativeJob]:
    """A store holding one urgent result with its narrative job, as scoring leaves it."""
    store = Store(tmp_path / "state" / "state.sqlite3")
    record = InstanceRecord(f"{UID}.1", UID, f"{UID}.9", "CR", "frontal")
    store.add_instance("a.dcm", 10, 1, record, now=100.0)
    (uid,) = store.complete_quiet_studies(1.0, now=200.0)
    study = store.study(uid)
    assert study is not None
    flag = flag_result()
    message = Message("result", TOPIC, flag.to_json_bytes(), flag.alert_id)
    job = NarrativeJob(flag.alert_id, UID, 1, "{}", time.time() + 60)
    assert store.commit_result(
        study, "urgent", message, {record.sop_instance_uid: ("scored", None)}, [], 201.0, job
    )
    yield store, job
    store.close()


def narrate(store: Store, job: NarrativeJob) -> int | None:
    return store.commit_narrative(job, TOPIC, narrated, time.time())


# -- the alert state machine of a narrative revision ---------------------------------------


def test_narrative_revision_carries_the_alert_and_an_ack_of_the_flag_silences_both(
    flagged: tuple[Store, NarrativeJob],
) -> None:
    store, job = flagged
    assert store.narrative_jobs() == [job]
    assert narrate(store, job) == 2 and store.narrative_jobs() == []
    follow = alert_id(UID, 2, SHA)
    assert store.alert(follow)["state"] == "pending"  # type: ignore[index]
    assert store.alert(job.alert_id)["state"] == "superseded"  # type: ignore[index]
    assert store.acknowledge(UID, job.alert_id, "dr", "t") == "acknowledged"
    assert store.alert(follow)["state"] == "acknowledged"  # type: ignore[index]
    assert store.enqueue_renotifications(time.time() + 10_000, 1, 10) == 0


def test_acknowledged_flag_stays_acknowledged_in_its_narrative_revision(
    flagged: tuple[Store, NarrativeJob],
) -> None:
    store, job = flagged
    assert store.acknowledge(UID, job.alert_id, "dr", "t") == "acknowledged"
    narrate(store, job)
    assert store.alert(alert_id(UID, 2, SHA))["state"] == "acknowledged"  # type: ignore[index]


def test_first_puback_and_the_ack_are_recorded_by_the_agents_clock(
    flagged: tuple[Store, NarrativeJob],
) -> None:
    """Time to notification and to acknowledgement (``edge-export evaluate --state``) are
    measured from these two columns; a second PUBACK or ack does not move them."""
    store, job = flagged
    conn = store._conn()

    def times() -> tuple[float | None, float | None]:
        return conn.execute(
            "SELECT r.published_at, a.ack_taken_at FROM results r "
            "JOIN alerts a ON a.alert_id = r.alert_id WHERE r.alert_id = ?",
            (job.alert_id,),
        ).fetchone()

    assert times() == (None, None)
    before = time.time()
    (message,) = store.outbox_messages()
    store.outbox_delete(message.id)
    published, _ = times()
    assert published is not None and before <= published <= time.time()
    store.outbox_delete(message.id)  # a second PUBACK of the same message
    assert times()[0] == published
    narrate(store, job)  # the narrative revision carries the alert on
    assert store.acknowledge(UID, job.alert_id, "dr", "1999-01-01T00:00:00Z") == "acknowledged"
    _, taken = times()
    assert taken is not None and published <= taken <= time.time()  # not the dashboard's time
    carried = conn.execute(
        "SELECT ack_taken_at FROM alerts WHERE carried_from = ?", (job.alert_id,)
    ).fetchone()[0]
    assert carried == taken
    assert store.acknowledge(UID, job.alert_id, "dr", "t") == "superseded"  # ack again
    assert times() == (published, taken)


def test_late_instance_drops_the_old_narrative(flagged: tuple[Store, NarrativeJob]) -> None:
    store, job = flagged
    record = InstanceRecord(f"{UID}.2", UID, f"{UID}.9", "CR", "lateral")
    store.add_instance("late.dcm", 10, 1, record, now=300.0)  # re-opens as revision 2
    built = store.commit_narrative(job, TOPIC, lambda *a: pytest.fail("built"), time.time())
    assert built is None and store.narrative_jobs() == []
    assert len(store.outbox_messages()) == 1


def test_state_database_of_schema_2_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    Store(path).close()
    as_schema(path, 2)  # alerts without carried_from, no narratives
    store = Store(path)
    layout = Layout.of(store._conn())
    assert layout.has("alerts", "carried_from") and store.narrative_jobs() == []
    store.close()


def test_state_database_of_schema_5_is_migrated_with_its_results_counted(
    tmp_path: Path,
) -> None:
    """Schema 6 adds the daily tallies and the PUBACK and ack times; the migration counts the
    results stored before (each study's first, on its UTC day), exactly as if the tallies had
    been kept then, and leaves the times it cannot know NULL."""
    path = tmp_path / "old.sqlite3"
    store = Store(path)
    inject = Injector(store)
    inject.result(f"{UID}.1", "urgent", now=86400.0 * 20_000)
    inject.result(f"{UID}.1", "routine", now=86400.0 * 20_001)  # revision 2: not counted
    inject.result(f"{UID}.2", "not_scored", now=86400.0 * 20_001)
    kept = tallies.read(store._conn())
    store.close()
    assert kept.levels_by_day() and kept.model == SHA
    as_schema(path, 5)  # no tallies, no PUBACK or ack times
    store = Store(path)
    try:
        assert tallies.read(store._conn()) == kept
        layout = Layout.of(store._conn())
        assert layout.has("results", "published_at") and layout.has("alerts", "ack_taken_at")
        assert layout.has("results", "pacs_stored_at")  # and on through 6 -> 7
        unknown = (
            "SELECT count(*) FROM results WHERE published_at IS NULL AND pacs_stored_at IS NULL"
        )
        assert store._conn().execute(unknown).fetchone() == (3,)
        version = store._conn().execute("SELECT value FROM meta WHERE key = 'schema_version'")
        assert version.fetchone() == (str(schema.SCHEMA_VERSION),)
    finally:
        store.close()


def test_a_fresh_database_has_exactly_what_the_migrations_lead_to(tmp_path: Path) -> None:
    """Each column a migration adds is in today's DDL (the history and today agree)."""
    fresh = Store(tmp_path / "fresh.sqlite3")
    layout = Layout.of(fresh._conn())
    fresh.close()
    for version, statements in schema.MIGRATIONS.items():
        assert version < schema.SCHEMA_VERSION
        for sql in statements:
            words = sql.split() if isinstance(sql, str) else []
            if words[:2] == ["ALTER", "TABLE"]:
                assert layout.has(words[2], words[5]), sql


# -- one report: P/status, edge-agent status and /metrics agree ----------------------------


def test_after_an_urgent_result_and_its_narrative_revision_the_three_views_agree(
    flagged: tuple[Store, NarrativeJob],
) -> None:
    """P/status used to count the narrative revision as a second result; status and
    /metrics did not."""
    store, job = flagged
    assert narrate(store, job) == 2
    counters = store.counters()
    status = read_status(store.path)
    metrics = of_state(store.path)
    assert counters["results"] == 1
    assert status.results_by_level == {"urgent": 1}
    assert metrics[("edge_triage_results_total", (("triage", "urgent"),))] == 1.0
    assert sum(v for (name, _), v in metrics.items() if name == "edge_triage_results_total") == 1
    waiting = metrics[("edge_triage_alerts_unacknowledged", ())]
    assert counters["urgent_unacknowledged"] == status.alerts_waiting == waiting == 1
    depth = metrics[("edge_triage_outbox_messages", ())]
    assert counters["outbox_depth"] == status.outbox == depth == 2
    assert counters["narratives_timeout"] == status.counters["narrative_timeout"] == 1


def test_status_reads_a_database_an_older_agent_wrote_without_changing_it(
    tmp_path: Path,
) -> None:
    """Schema 1 had no alerts, narratives, set-aside columns, PACS outbox or tallies: read
    as none."""
    path = tmp_path / "state.sqlite3"
    Store(path).close()
    as_schema(path, 1)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO results VALUES ('A1', '1.2', 1, 'review', x'7b7d', 1.0)")
    before = path.read_bytes()
    status = read_status(path)
    assert status.results_by_level == {"review": 1} and status.narratives_pending is None
    assert status.outbox_set_aside == 0 and status.set_aside == []
    assert of_state(path)[("edge_triage_results_total", (("triage", "review"),))] == 1.0
    assert path.read_bytes() == before


# -- no torch on the store's path ----------------------------------------------------------

NO_TORCH = """
import sys


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
"""


@pytest.mark.slow
def test_the_store_tests_run_where_torch_cannot_be_imported(tmp_path: Path) -> None:
    """The store and alert state-machine tests used to live beside the narrative model's
    (skipped as a module without torch); they run on a box without the [export] extra."""
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH)
    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(tests.parent)]))
    probe = "import edge_agent.store, edge_agent.status, edge_agent.metrics, sys;"
    probe += "assert 'torch' not in sys.modules"
    blocked = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True
    )
    assert blocked.returncode != 0 and "(blocked)" in blocked.stderr  # the block works
    subprocess.run([sys.executable, "-c", probe], env=env, check=True)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'bt'}",
            "-m",
            "not slow",
            str(tests / "test_store.py"),
            str(tests / "test_state.py"),
        ],
        env=env,
        cwd=tests.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skipped" not in run.stdout and " passed" in run.stdout, run.stdout
