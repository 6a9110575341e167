"""The daemon with ``[pacs]`` on, as its own process: results go to MQTT and, for the chosen
levels, as SRs into a real Orthanc; a PACS that refuses the association leaves MQTT alone
and says why in ``edge-agent status`` and the log."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.daemon import (
    BASE,
    DEVICE,
    MATRIX,
    SITE,
    Collector,
    Daemon,
    assert_no_phi,
    write_agent_config,
)
from helpers.orthanc import Orthanc, needs_orthanc
from helpers.polling import wait_until

from edge_agent.devbroker import Mosquitto, Pki
from edge_agent.pacs.sr import sop_instance_uid
from edge_agent.results import StudyResult
from edge_agent.simulate import simulate
from edge_agent.status import format_status, read_status
from export.evaluation.command import time_to_notification

pytestmark = [pytest.mark.slow, needs_orthanc]

assert BASE  # the collector subscribes to it


def config_for(tmp_path: Path, broker: Mosquitto, pacs: str) -> Path:
    """The daemon tests' agent config with the PACS destination on: ``pacs`` (TOML) adds to
    its ``[pacs]`` section."""
    return write_agent_config(
        tmp_path,
        broker,
        site=SITE,
        device_id=DEVICE,
        extra=f"[pacs]\nenabled = true\nretry_max_seconds = 2\ntimeout_seconds = 5\n{pacs}",
    )


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Mosquitto, Orthanc, Collector]]:
    broker = Mosquitto(tmp_path / "broker").start()
    orthanc = Orthanc(tmp_path / "orthanc")
    orthanc.start()
    collector = Collector(broker.host, broker.port)
    try:
        yield broker, orthanc, collector
    finally:
        collector.close()
        orthanc.stop()
        broker.stop()


def test_results_of_the_chosen_levels_arrive_as_srs_in_their_studies(
    tmp_path: Path, peers: tuple[Mosquitto, Orthanc, Collector]
) -> None:
    broker, orthanc, collector = peers
    # Every level, so that each simulated study has its SR whatever the demo model says.
    levels = 'levels = ["urgent", "review", "routine", "not_scored"]\n'
    where = f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\ncalled_ae = "ORTHANC"\n'
    daemon = Daemon(config_for(tmp_path, broker, where + levels), tmp_path / "agent.log")
    daemon.start()
    try:
        studies = list(simulate(tmp_path / "incoming", studies=3, abnormal=0.5, seed=11, **MATRIX))
        collector.wait(lambda: len(collector.results()) >= 3, 90, "3 study results on MQTT")
        results = [StudyResult.model_validate(r) for r in collector.results()]
        want = {sop_instance_uid(r): r.study_instance_uid for r in results}

        def stored() -> dict[str, str]:
            return {
                i["SOPInstanceUID"]: i["StudyInstanceUID"]
                for i in orthanc.instances()
                if i.get("Modality") == "SR"
            }

        wait_until(lambda: stored() == want, 60, "one SR per result in Orthanc", poll=0.5)
        assert set(want.values()) == {s.study_instance_uid for s in studies}
        status = read_status(tmp_path / "state" / "state.sqlite3")
        assert status.pacs_outbox == 0 and status.counters.get("pacs_stored") == 3
        # Each result keeps when the PACS stored its SR: time to PACS, from the same state.
        _, _, to_pacs = time_to_notification(tmp_path / "state" / "state.sqlite3")
        in_pacs = to_pacs["stages"]["result_to_pacs"]
        assert (to_pacs["studies"], to_pacs["waiting"], in_pacs["studies"]) == (3, 0, 3)
        assert 0 < in_pacs["p50_s"] <= in_pacs["max_s"] < 60
        assert to_pacs["p50_s"] > in_pacs["p50_s"]  # the whole road includes the scoring
        # What the PACS holds is valid for dicom3tools and readable by dcmtk.
        for n, item in enumerate(i for i in orthanc.instances() if i.get("Modality") == "SR"):
            path = tmp_path / f"sr{n}.dcm"
            path.write_bytes(orthanc.file(item["id"]))
            check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            errors = [
                x for x in (check.stdout + check.stderr).splitlines() if x.startswith("Error")
            ]
            assert errors == [], errors
            dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
            assert dump.returncode == 0 and "AI triage level" in dump.stdout
    finally:
        daemon.kill()
    assert_no_phi(collector, daemon.log)


def test_a_pacs_that_refuses_the_association_leaves_mqtt_going_and_says_why(
    tmp_path: Path, peers: tuple[Mosquitto, Orthanc, Collector]
) -> None:
    broker, orthanc, collector = peers
    levels = 'levels = ["urgent", "review", "routine", "not_scored"]\n'
    where = f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\ncalled_ae = "NOTORTHANC"\n'
    daemon = Daemon(config_for(tmp_path, broker, where + levels), tmp_path / "agent.log")
    daemon.start()
    try:
        list(simulate(tmp_path / "incoming", studies=2, abnormal=0.5, seed=5, **MATRIX))
        collector.wait(lambda: len(collector.results()) >= 2, 90, "2 study results on MQTT")
        database = tmp_path / "state" / "state.sqlite3"
        wait_until(
            lambda: bool(read_status(database).pacs_last_error), 30, "a PACS failure", poll=0.5
        )
        status = read_status(database)
        assert status.pacs_outbox == 2
        assert "Called AE title not recognised" in (status.pacs_last_error or "")
        assert "pacs       last problem: association rejected permanently" in format_status(status)
        assert "Called AE title not recognised" in daemon.log.read_text()
        assert [i for i in orthanc.instances() if i.get("Modality") == "SR"] == []
    finally:
        daemon.kill()
    assert_no_phi(collector, daemon.log)


def test_sigkill_while_srs_are_sent_loses_none_and_stores_none_twice(
    tmp_path: Path, peers: tuple[Mosquitto, Orthanc, Collector]
) -> None:
    """SIGKILL lands somewhere in the PACS worker's loop (maybe between a C-STORE and its
    row's removal: not aimed, the window is not forced); after the restart every result has
    exactly its SR, with the UID derived from it."""
    broker, orthanc, collector = peers
    levels = 'levels = ["urgent", "review", "routine", "not_scored"]\n'
    where = f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\ncalled_ae = "ORTHANC"\n'
    config = config_for(tmp_path, broker, where + levels)
    database = tmp_path / "state" / "state.sqlite3"
    daemon = Daemon(config, tmp_path / "agent.log")
    daemon.start()
    try:
        list(simulate(tmp_path / "incoming", studies=6, abnormal=0.5, seed=17, **MATRIX))
        wait_until(
            lambda: (
                database.exists() and (read_status(database).counters.get("pacs_stored", 0) >= 1)
            ),
            90,
            "the first SR stored",
            poll=0.05,
        )
        daemon.kill()  # SIGKILL
        daemon.start()
        collector.wait(lambda: len(collector.results()) >= 6, 120, "6 results on MQTT")
        wait_until(
            lambda: (
                read_status(database).pacs_outbox == 0
                and len(read_status(database).results_by_level) > 0
                and sum(read_status(database).results_by_level.values()) == 6
            ),
            90,
            "every result's SR stored",
            poll=0.5,
        )
    finally:
        daemon.kill()
    results = {StudyResult.model_validate(r).alert_id: r for r in collector.results()}
    want = {sop_instance_uid(StudyResult.model_validate(r)) for r in results.values()}
    srs = [i["SOPInstanceUID"] for i in orthanc.instances() if i.get("Modality") == "SR"]
    assert sorted(srs) == sorted(want) and len(srs) == 6


def test_a_pacs_requiring_a_client_certificate_over_the_daemon(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The daemon against an Orthanc that requires a client certificate: without
    ``tls_cert``/``tls_key`` its SRs wait, status and the log say what TLS said; restarted
    with the pair, they are stored. MQTT goes on throughout."""
    fleet = Pki(tmp_path / "ca")
    cert, key = fleet.issue("pacs", "pacs.hospital.lan", dns=["localhost"], ip=["127.0.0.1"])
    client_cert, client_key = fleet.issue("agent", "EDGETRIAGE")
    orthanc = Orthanc(
        tmp_path / "orthanc", tls=(cert, key, fleet.ca_cert), require_client_cert=True
    )
    orthanc.start()
    collector = Collector(mosquitto.host, mosquitto.port)
    where = (
        f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\ncalled_ae = "ORTHANC"\n'
        f'levels = ["urgent", "review", "routine", "not_scored"]\ntls_ca = "{fleet.ca_cert}"\n'
    )
    database = tmp_path / "state" / "state.sqlite3"
    daemon = Daemon(config_for(tmp_path, mosquitto, where), tmp_path / "agent.log")
    daemon.start()
    try:
        list(simulate(tmp_path / "incoming", studies=2, abnormal=0.5, seed=29, **MATRIX))
        collector.wait(lambda: len(collector.results()) >= 2, 90, "2 study results on MQTT")
        wait_until(
            lambda: bool(read_status(database).pacs_last_error), 30, "a PACS failure", poll=0.5
        )
        words = "tlsv13 alert certificate required (the PACS requires a client certificate"
        status = read_status(database)
        assert status.pacs_outbox == 2 and words in (status.pacs_last_error or "")
        assert "pacs       last problem: TLS refused with ORTHANC@" in format_status(status)
        said = daemon.log.read_text()
        assert words in said
        # Said once per attempt by the worker, not again by pynetdicom with a traceback.
        assert "Traceback" not in said and "pynetdicom" not in said, said
        daemon.kill()

        pair = f'tls_cert = "{client_cert}"\ntls_key = "{client_key}"\n'
        daemon = Daemon(config_for(tmp_path, mosquitto, where + pair), tmp_path / "agent.log")
        daemon.start()
        wait_until(lambda: read_status(database).pacs_outbox == 0, 60, "the SRs stored", poll=0.5)
        want = {sop_instance_uid(StudyResult.model_validate(r)) for r in collector.results()}
        assert {i["SOPInstanceUID"] for i in orthanc.instances()} == want
    finally:
        daemon.kill()
        collector.close()
        orthanc.stop()
    assert_no_phi(collector, daemon.log)
