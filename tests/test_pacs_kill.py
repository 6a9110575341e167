"""The agent (its own process) SIGKILLed exactly between the PACS storing an SR and the
agent removing its ``pacs_outbox`` row, at both ends of that window:

* before the answer: the test's PACS keeps the SR, then SIGKILLs the agent before it
  answers the C-STORE;
* after the answer: the PACS locks the agent's state database (``BEGIN EXCLUSIVE``) and
  answers success; once the agent has the answer (it released the association, or, were it
  to keep associations open, it read every byte of the answer), its row's removal cannot
  happen before the lock is gone, and the test SIGKILLs it, then unlocks.

Restarted against the same PACS, the agent sends that result's SR again: the same SOP
Instance UID, byte for byte the same data set, and no other SR twice; every row ends
delivered, every result reaches MQTT, and a PACS that keeps one copy per SOP Instance UID
(as Orthanc does) holds exactly one SR per result.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from helpers.brokers import Mosquitto
from helpers.daemon import DEVICE, MATRIX, SITE, Collector, Daemon, write_agent_config
from helpers.pacs import Received, StorageScp
from helpers.polling import wait_until

from edge_agent.devbroker import HOST
from edge_agent.pacs.sr import sop_instance_uid
from edge_agent.results import StudyResult
from edge_agent.simulate import simulate
from edge_agent.status import read_status

pytestmark = pytest.mark.slow

STUDIES = 3


@pytest.fixture
def scp() -> Iterator[StorageScp]:
    server = StorageScp()
    try:
        yield server
    finally:
        server.close()


def query(database: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as conn:
        return conn.execute(sql).fetchall()


def stored_results(database: Path) -> list[StudyResult]:
    return [
        StudyResult.model_validate_json(bytes(p))  # type: ignore[arg-type]
        for (p,) in query(database, "SELECT payload FROM results")
    ]


def pending(database: Path) -> set[str]:
    return {str(a) for (a,) in query(database, "SELECT alert_id FROM pacs_outbox")}


@pytest.mark.parametrize("moment", ["before the answer", "after the answer"])
def test_sigkill_between_the_c_store_and_the_row_leaving_resends_the_same_instance(
    tmp_path: Path, mosquitto: Mosquitto, scp: StorageScp, moment: str
) -> None:
    levels = '["urgent", "review", "routine", "not_scored"]'
    config = write_agent_config(
        tmp_path,
        mosquitto,
        site=SITE,
        device_id=DEVICE,
        extra=(
            f'[pacs]\nenabled = true\nhost = "{HOST}"\nport = {scp.port}\n'
            f'called_ae = "{scp.ae_title}"\nlevels = {levels}\n'
            "retry_max_seconds = 2\ntimeout_seconds = 5\n"
        ),
    )
    database = tmp_path / "state" / "state.sqlite3"
    daemon = Daemon(config, tmp_path / "agent.log")
    collector = Collector(mosquitto.host, mosquitto.port)
    first: list[Received] = []  # the C-STORE the kill is aimed at
    locks: list[sqlite3.Connection] = []

    def kill_before_the_answer(item: Received) -> None:
        if not first:
            first.append(item)
            daemon.kill()  # SIGKILL, and reaped: the status below goes to a dead agent

    def lock_then_answer(item: Received) -> None:
        if not first:
            first.append(item)
            conn = sqlite3.connect(
                database, isolation_level=None, timeout=30, check_same_thread=False
            )
            conn.execute("BEGIN EXCLUSIVE")  # the agent's next write waits on it
            locks.append(conn)

    scp.on_store = kill_before_the_answer if moment == "before the answer" else lock_then_answer
    daemon.start()
    try:
        list(simulate(tmp_path / "incoming", studies=STUDIES, abnormal=0.5, seed=23, **MATRIX))
        if moment == "before the answer":
            scp.wait(lambda: bool(first), 120, "the first C-STORE")
            wait_until(lambda: not daemon.alive(), 10, "the agent killed")
        else:
            # Once the agent has the C-STORE's answer, it is between the answer and the
            # row's removal, which the lock holds.
            wait_until(scp.agent_has_answer, 120, "the agent to have the answer", poll=0.01)
            assert daemon.alive()
            daemon.kill()
            locks[0].execute("ROLLBACK")
            locks[0].close()
        (killed,) = first
        # Its result, found by study (not by the UID rule, which is what is under test).
        (result,) = [r for r in stored_results(database) if r.study_instance_uid == killed.study]
        assert result.alert_id in pending(database)  # stored at the PACS, its row waiting
        assert f"PACS: SR of result {result.alert_id}" not in daemon.log.read_text()

        scp.on_store = None
        daemon.start()
        collector.wait(
            lambda: len({r["alert_id"] for r in collector.results()}) >= STUDIES,
            120,
            f"{STUDIES} results on MQTT",
        )
        # Every result is stored by now, each with its row: no row left, every SR sent.
        wait_until(lambda: not pending(database), 90, "every row delivered", poll=0.2)
    finally:
        daemon.kill()
        collector.close()
        for conn in locks:
            conn.close()

    # The resent SR is the same instance, byte for byte.
    (before, again) = [r for r in scp.received if r.study == killed.study]
    assert before == killed
    assert again.sop_instance_uid == killed.sop_instance_uid, "a new UID for a retried SR"
    assert again.encoded == killed.encoded
    # No other SR sent twice; a PACS keeping one copy per UID holds one SR per result, in its
    # study; every result reached MQTT; nothing is left in either destination's outbox.
    results = stored_results(database)
    assert len(results) >= STUDIES
    sent = Counter(r.sop_instance_uid for r in scp.received)
    assert sent == {sop_instance_uid(r): 1 + (r.alert_id == result.alert_id) for r in results}
    assert {u: k.study for u, k in scp.instances().items()} == {
        sop_instance_uid(r): r.study_instance_uid for r in results
    }
    assert {r["alert_id"] for r in collector.results()} == {r.alert_id for r in results}
    status = read_status(database)
    assert status.pacs_outbox == 0 and status.counters.get("pacs_stored") == len(results)
