"""`edge-agent status`: what the state database says, read-only, without patient data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.status import format_status, read_status
from edge_agent.store import InstanceRecord, Message, Store


def result_payload(triage: str) -> bytes:
    return json.dumps(
        {
            "triage": triage,
            "accession_number": "ACC-SECRET-1",
            "findings": [
                {"code": "pneumothorax", "score": 0.91},
                {"code": "lung_nodule", "score": 0.12},
            ],
        }
    ).encode()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    folder = tmp_path / "state"
    store = Store(folder / "state.sqlite3")
    try:
        for n, study in enumerate(("1.2.3", "1.2.4")):
            record = InstanceRecord(f"{study}.1", study, f"{study}.9", "CR", "frontal")  # type: ignore[arg-type]
            store.add_instance(f"{study}.dcm", 10, 1, record, now=100.0 + n)
        store.add_instance(
            "open.dcm",
            10,
            1,
            InstanceRecord("1.2.5.1", "1.2.5", "1.2.5.9", "CR", "frontal"),  # type: ignore[arg-type]
            now=500.0,
        )
        store.complete_quiet_studies(10.0, now=200.0)
        study = store.study("1.2.3")
        assert study is not None
        message = Message("result", "p/study/1.2.3", result_payload("urgent"), "alert-1")
        assert store.commit_result(
            study, "urgent", message, {"1.2.3.1": ("scored", None)}, [], 201.0
        )
        store.record_file("junk/readme.txt", 5, 1, "rejected", "not a DICOM file", 202.0)
    finally:
        store.close()
    return folder


def test_status_reports_queue_outbox_alerts_rejects_and_results(state: Path) -> None:
    report = read_status(state / "state.sqlite3", now=211.0)
    assert report.studies == {"open": 1, "complete": 1, "scored": 1}
    assert report.outbox == 1 and report.outbox_urgent == 1
    assert report.results_by_level == {"urgent": 1}
    assert report.outbox_oldest_seconds == pytest.approx(10.0)
    assert report.rejected == 1 and report.last_rejected[0]["reason"] == "not a DICOM file"
    (last,) = report.last_results
    assert last["triage"] == "urgent" and last["top_finding"] == "pneumothorax"
    assert last["study_instance_uid"] == "1.2.3" and last["modality"] == "CR"
    text = format_status(report)
    assert "complete (waiting to be scored) 1" in text and "pneumothorax 0.91" in text
    assert "ACC-SECRET-1" not in text and "ACC-SECRET-1" not in json.dumps(report.as_dict())


def test_status_command_reads_the_configured_state_dir(
    state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in ("EDGE_AGENT_CONFIG", "EDGE_AGENT_BUNDLE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("EDGE_AGENT_STATE_DIR", str(state))
    monkeypatch.setenv("EDGE_AGENT_WATCH_DIR", str(state))
    assert main(["status"]) == 0
    assert "scored 1" in capsys.readouterr().out
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outbox"] == 1


def test_status_without_a_database_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("EDGE_AGENT_CONFIG", raising=False)
    monkeypatch.setenv("EDGE_AGENT_STATE_DIR", str(tmp_path / "never-ran"))
    monkeypatch.setenv("EDGE_AGENT_WATCH_DIR", str(tmp_path))
    assert main(["status"]) == 3
    assert "no state database" in capsys.readouterr().err
