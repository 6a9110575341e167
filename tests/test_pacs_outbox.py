"""The PACS destination of the outbox: schema 5, its rows queued with their results, the PACS
worker against a real Orthanc (outage included), and status and /metrics showing it."""

from __future__ import annotations

import io
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.metrics import of_state
from helpers.old_state import as_schema
from helpers.orthanc import Orthanc, needs_orthanc
from helpers.pacs import CONCEPTS, commit_study, worker_for, worker_running
from helpers.polling import wait_until
from pydicom import dcmread

from edge_agent.config import PacsSettings
from edge_agent.devbroker import HOST, Pki
from edge_agent.pacs.scu import store
from edge_agent.pacs.sr import build_sr, sop_instance_uid
from edge_agent.state import schema
from edge_agent.status import format_status, read_status
from edge_agent.store import Store
from edge_agent.workers.pacs import backoff

# pynetdicom 3.0.4 drops the socket of a refused connection without closing it; CPython
# closes it by reference count, with a ResourceWarning pytest reports (see test_pacs_scu).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

LEVELS = ("urgent", "review")


def settings_for(port: int, retry_max: float = 1.0) -> PacsSettings:
    return PacsSettings(
        enabled=True,
        host=HOST,
        port=port,
        called_ae="ORTHANC",
        timeout_seconds=3,
        retry_max_seconds=retry_max,
    )


@pytest.fixture
def watch(tmp_path: Path) -> Path:
    folder = tmp_path / "incoming"
    folder.mkdir()
    return folder


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "orthanc") as server:
        yield server


# -- schema and queueing --------------------------------------------------------------------


def test_schema_4_is_migrated_and_old_results_are_not_sent(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    Store(path).close()
    as_schema(path, 4)  # no pacs_outbox
    with sqlite3.connect(path) as db:
        db.executescript("INSERT INTO results VALUES ('A1', '1.2', 1, 'urgent', x'7b7d', 1.0);")
    st = Store(path, pacs_levels=LEVELS)
    assert schema.Layout.of(st._conn()).has("pacs_outbox", "next_attempt_at")
    (version,) = (
        st._conn().execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    )
    assert version == str(schema.SCHEMA_VERSION)
    assert st.pacs_depth() == 0
    st.close()


def test_results_of_the_chosen_levels_are_queued_once_with_their_result(
    tmp_path: Path, watch: Path
) -> None:
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    urgent, _ = commit_study(st, watch, "urgent", 1)
    review, _ = commit_study(st, watch, "review", 2)
    commit_study(st, watch, "routine", 3)
    due = st.pacs_due(time.time() + 1)
    assert [r.alert_id for r in due] == [urgent.alert_id, review.alert_id]
    assert st.pacs_depth() == 2
    st.close()
    off = Store(tmp_path / "off.sqlite3")  # pacs not enabled: nothing queued
    commit_study(off, watch, "urgent", 4)
    assert off.pacs_depth() == 0
    off.close()


def test_backoff_doubles_up_to_its_ceiling() -> None:
    assert [backoff(n, 10.0) for n in (1, 2, 3, 4, 5, 50)] == [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


# -- the worker against Orthanc -------------------------------------------------------------


@needs_orthanc
def test_urgent_and_review_results_become_srs_in_their_studies(
    tmp_path: Path, watch: Path, orthanc: Orthanc
) -> None:
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    urgent, urgent_sops = commit_study(st, watch, "urgent", 1, images=2)
    review, review_sops = commit_study(st, watch, "review", 2)
    commit_study(st, watch, "routine", 3)
    worker = worker_for(st, watch, settings_for(orthanc.dicom_port), threading.Event())
    assert worker.step(time.time())
    worker.close()
    assert st.pacs_depth() == 0 and worker.last_error is None
    stored = {i["SOPInstanceUID"]: i for i in orthanc.instances() if i.get("Modality") == "SR"}
    assert set(stored) == {sop_instance_uid(urgent), sop_instance_uid(review)}
    for result, sops in ((urgent, urgent_sops), (review, review_sops)):
        tags = stored[sop_instance_uid(result)]
        assert tags["StudyInstanceUID"] == result.study_instance_uid
        sr = dcmread(io.BytesIO(orthanc.file(tags["id"])))
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert {
            ref.ReferencedSOPInstanceUID
            for series in evidence.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        } == set(sops)
        level = result.triage
        assert any(
            item.ConceptCodeSequence[0].CodeValue == level
            for group in sr.ContentSequence
            if "ContentSequence" in group
            for sub in group.ContentSequence
            if "ContentSequence" in sub
            for item in sub.ContentSequence
            if item.ValueType == "CODE" and "ConceptCodeSequence" in item
        )
    assert st.counters() is not None
    assert read_status(st.path).counters.get("pacs_stored") == 2
    st.close()


@needs_orthanc
def test_a_store_before_a_crash_is_sent_again_as_the_same_instance(
    tmp_path: Path, watch: Path, orthanc: Orthanc
) -> None:
    """The C-STORE went through but the row was not removed (the agent was killed between
    the two): the retry carries the same SOP Instance UID and the PACS keeps one copy.
    (Simulated in-process by storing the SR the worker would build; not a SIGKILL.)"""
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    result, _ = commit_study(st, watch, "urgent", 1)
    worker = worker_for(st, watch, settings_for(orthanc.dicom_port), threading.Event())
    store(
        worker.peer, build_sr(result, worker.sources(result), concepts=CONCEPTS, agent="site/box")
    )
    assert st.pacs_depth() == 1  # the row is still there, as after the crash
    assert worker.step(time.time())
    worker.close()
    srs = [i for i in orthanc.instances() if i.get("Modality") == "SR"]
    assert [i["SOPInstanceUID"] for i in srs] == [sop_instance_uid(result)]
    assert st.pacs_depth() == 0
    st.close()


@pytest.mark.slow
@needs_orthanc
def test_orthanc_down_20_s_mid_burst_every_sr_arrives_once(
    tmp_path: Path, watch: Path, orthanc: Orthanc
) -> None:
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    results = []
    with worker_running(st, watch, settings_for(orthanc.dicom_port)) as (worker, _, _):
        for i in range(6):
            results.append(commit_study(st, watch, "urgent" if i % 2 else "review", i)[0])
        wait_until(lambda: st.pacs_depth() == 0, 30, "the first burst stored")
        orthanc.stop()
        for i in range(6, 14):
            results.append(commit_study(st, watch, "urgent" if i % 2 else "review", i)[0])
        wait_until(lambda: worker.last_error is not None, 10, "a failed attempt")
        time.sleep(20)
        assert st.pacs_depth() == 8
        status = read_status(st.path)
        assert status.pacs_outbox == 8 and status.pacs_failing == 8
        assert status.pacs_last_error and "cannot connect" in status.pacs_last_error
        assert "pacs       last problem: cannot connect" in format_status(status)
        metrics = of_state(st.path)
        assert metrics[("edge_triage_pacs_outbox_messages", ())] == 8.0
        assert any(name == "edge_triage_pacs_last_error_info" for name, _ in metrics)
        orthanc.start()
        wait_until(lambda: st.pacs_depth() == 0, 30, "every SR stored after the outage")
    srs = [i["SOPInstanceUID"] for i in orthanc.instances() if i.get("Modality") == "SR"]
    assert sorted(srs) == sorted(sop_instance_uid(r) for r in results)
    assert len(set(srs)) == len(srs) == 14
    assert read_status(st.path).counters.get("pacs_stored") == 14
    st.close()


def test_a_source_image_gone_keeps_the_row_with_its_reason(tmp_path: Path, watch: Path) -> None:
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    result, sops = commit_study(st, watch, "urgent", 1)
    (watch / f"{sops[0]}.dcm").unlink()
    worker = worker_for(
        st, watch, settings_for(9), threading.Event()
    )  # never dialled: the build fails first
    before = time.time()
    assert worker.step(before)
    assert st.pacs_depth() == 1
    assert worker.last_error == "a scored image is no longer in the watch folder"
    assert st.pacs_due(before + 1.0) == []  # backed off (2 s)
    assert [r.alert_id for r in st.pacs_due(before + 3.0)] == [result.alert_id]
    assert read_status(st.path).pacs_last_error == worker.last_error
    st.close()


@pytest.mark.slow
@needs_orthanc
def test_a_pacs_requiring_a_client_certificate_gets_it_or_says_why(
    tmp_path: Path, watch: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS that requires a client certificate: the worker without ``tls_cert``/``tls_key``
    keeps the row, and status and the log say what TLS said and which keys; with the pair,
    the SR is stored."""
    fleet = Pki(tmp_path / "ca")
    cert, key = fleet.issue("pacs", "pacs.hospital.lan", dns=["localhost"], ip=[HOST])
    client_cert, client_key = fleet.issue("agent", "EDGETRIAGE")
    server = Orthanc(tmp_path / "orthanc", tls=(cert, key, fleet.ca_cert), require_client_cert=True)
    server.start()
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    try:
        result, _ = commit_study(st, watch, "urgent", 1)
        no_pair = settings_for(server.dicom_port).model_copy(update={"tls_ca": fleet.ca_cert})
        worker = worker_for(st, watch, no_pair, threading.Event())
        with caplog.at_level(logging.WARNING, logger="edge_agent.workers.pacs"):
            assert worker.step(time.time())
        assert st.pacs_depth() == 1
        words = "tlsv13 alert certificate required (the PACS requires a client certificate"
        status = read_status(st.path)
        assert status.pacs_last_error and words in status.pacs_last_error
        assert "pacs       last problem: TLS refused with ORTHANC@" in format_status(status)
        assert any(words in r.getMessage() for r in caplog.records)

        with_pair = no_pair.model_copy(update={"tls_cert": client_cert, "tls_key": client_key})
        worker = worker_for(st, watch, with_pair, threading.Event())
        assert worker.step(time.time() + 3.0)  # after the back-off
        assert st.pacs_depth() == 0
        srs = [i["SOPInstanceUID"] for i in server.instances()]
        assert srs == [sop_instance_uid(result)]
    finally:
        st.close()
        server.stop()
