"""`edge-agent status`: what the state database says, read-only, without patient data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers.delivery import SHA, Injector
from helpers.old_state import as_schema
from helpers.status import make_state, result_payload

from edge_agent.cli import main
from edge_agent.identifiers import FILE_ID_KEY, file_id
from edge_agent.status import find_file, format_status, read_status
from edge_agent.store import InstanceRecord, Message, Store


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state database: one urgent result, an open study, one rejected file."""
    return make_state(tmp_path / "state")


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


# -- file ids, names from outside, a closed pipe ---------------------------------------------

PATIENT_FOLDER = "DOE^JANE 19700101/IM\x1b]0;owned\x07\x1b[2J\n0001.dcm"


@pytest.fixture
def rejects(tmp_path: Path) -> tuple[Path, str]:
    """A state folder with a rejected file named after a patient, with terminal escapes;
    returns it and the file's id."""
    folder = tmp_path / "state"
    store = Store(folder / "state.sqlite3")
    try:
        store.record_file(PATIENT_FOLDER, 5, 1, "rejected", "not a DICOM file", 300.0)
        key = store.secret(FILE_ID_KEY)
    finally:
        store.close()
    return folder, file_id(key, PATIENT_FOLDER)


def test_status_shows_names_from_outside_escaped(
    rejects: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, fid = rejects
    monkeypatch.delenv("EDGE_AGENT_CONFIG", raising=False)
    monkeypatch.setenv("EDGE_AGENT_STATE_DIR", str(folder))
    monkeypatch.setenv("EDGE_AGENT_WATCH_DIR", str(folder))
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if fid in x)
    assert line.endswith(
        f"{fid}  DOE^JANE 19700101/IM\\x1b]0;owned\\x07\\x1b[2J\\n0001.dcm: not a DICOM file"
    )
    assert "\x1b" not in out and "\x07" not in out
    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["last_rejected"][0]["file_id"] == fid
    assert report["last_rejected"][0]["path"] == PATIENT_FOLDER  # JSON escapes it itself


def test_status_file_resolves_a_file_id_to_its_path(
    rejects: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, fid = rejects
    monkeypatch.delenv("EDGE_AGENT_CONFIG", raising=False)
    monkeypatch.setenv("EDGE_AGENT_STATE_DIR", str(folder))
    monkeypatch.setenv("EDGE_AGENT_WATCH_DIR", str(folder))
    assert main(["status", "--file", fid]) == 0
    out = capsys.readouterr().out
    assert f"file       {fid}" in out and "status     rejected: not a DICOM file" in out
    assert "path       DOE^JANE 19700101/IM\\x1b]0;owned" in out and "\x1b" not in out
    assert main(["status", "--file", fid.upper(), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == PATIENT_FOLDER
    assert main(["status", "--file", "0" * 16]) == 1
    assert "no file with id" in capsys.readouterr().err
    # the id is keyed: another box (another key) gives the same path another id
    assert find_file(folder / "state.sqlite3", file_id(b"\0" * 32, PATIENT_FOLDER)) is None


def test_status_piped_into_head_exits_quietly(tmp_path: Path) -> None:
    """``edge-agent status | head`` used to end in BrokenPipeError; now it exits as a
    command killed by SIGPIPE does, without a word on stderr."""
    import sqlite3
    import subprocess
    import sys
    from contextlib import closing

    folder = tmp_path / "state"
    Store(folder / "state.sqlite3").close()
    with closing(sqlite3.connect(folder / "state.sqlite3")) as db, db:
        db.executemany(  # more rejects than a pipe holds (64 KiB)
            "INSERT INTO files VALUES (?, 1, 1, 'rejected', 'not a DICOM file', NULL, NULL, ?)",
            [(f"folder/{n:06d}-{'x' * 60}.dcm", float(n)) for n in range(3000)],
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env.update(EDGE_AGENT_STATE_DIR=str(folder), EDGE_AGENT_WATCH_DIR=str(folder))
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "status", "--last", "3000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert agent.stdout is not None and agent.stderr is not None
    assert agent.stdout.readline().startswith(b"state ")
    agent.stdout.close()  # what head does once it has its lines
    err = agent.stderr.read().decode()
    agent.stderr.close()
    assert agent.wait(60) == 141, err
    assert err == ""


def test_status_file_finds_an_instance_rejected_when_its_study_was_scored(
    tmp_path: Path,
) -> None:
    """P/rejected also names files whose image failed at scoring: --file says so."""
    database = tmp_path / "state.sqlite3"
    store = Store(database)
    try:
        record = InstanceRecord("1.2.7.1", "1.2.7", "1.2.7.9", "CR", "frontal")  # type: ignore[arg-type]
        store.add_instance("room 2/img.dcm", 10, 1, record, now=100.0)
        store.complete_quiet_studies(10.0, now=200.0)
        study = store.study("1.2.7")
        assert study is not None
        message = Message("result", "p/study/1.2.7", result_payload("not_scored"), "alert-7")
        states = {"1.2.7.1": ("rejected", "pixel data cannot be decoded")}
        assert store.commit_result(study, "not_scored", message, states, [], 201.0)
        fid = file_id(store.secret(FILE_ID_KEY), "room 2/img.dcm")
    finally:
        store.close()
    found = find_file(database, fid)
    assert found is not None
    assert found["path"] == "room 2/img.dcm" and found["status"] == "rejected"
    assert found["reason"] == "pixel data cannot be decoded"
    assert found["study_instance_uid"] == "1.2.7" and found["sop_instance_uid"] == "1.2.7.1"


# -- the daily tallies ----------------------------------------------------------------------

NOW = 20_000 * 86400.0 + 43200.0  # 2024-10-04 12:00 UTC


def test_status_shows_per_finding_scores_and_levels_by_utc_day(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each study once, at its first result: today's and the last 7 days' figures per
    finding, and studies by level for each of the 7 UTC days."""
    folder = tmp_path / "state"
    store = Store(folder / "state.sqlite3")
    inject = Injector(store)
    try:
        inject.result("1.2.3.1", "urgent", now=NOW)  # pneumothorax 0.93 (urgent 0.6)
        inject.result("1.2.3.2", "routine", now=NOW - 60)  # 0.05
        inject.result("1.2.3.2", "urgent", now=NOW - 30)  # its revision 2: not counted
        inject.result("1.2.3.3", "review", now=NOW - 2 * 86400)  # 0.45 (review 0.3)
        inject.result("1.2.3.4", "not_scored", now=NOW - 3 * 86400)
        inject.result("1.2.3.5", "review", now=NOW - 7 * 86400)  # outside the 7 days
    finally:
        store.close()
    report = read_status(folder / "state.sqlite3", now=NOW)
    scores = report.scores
    assert scores is not None and scores["day"] == "2024-10-04" and scores["model_sha256"] == SHA
    pneumothorax = scores["findings"]["pneumothorax"]
    assert pneumothorax["today"] == {
        "studies": 2,
        "mean_score": 0.49,
        "median_score": pytest.approx(0.05, abs=0.01),
        "over_review_share": 0.5,
        "over_urgent_share": 0.5,
    }
    assert pneumothorax["last_7_days"]["studies"] == 3
    assert pneumothorax["last_7_days"]["over_review_share"] == round(2 / 3, 4)
    days = scores["levels_by_day"]
    assert [d["day"] for d in days] == [f"2024-09-{d}" for d in range(28, 31)] + [
        f"2024-10-0{d}" for d in range(1, 5)
    ]
    assert days[-1] == {
        "day": "2024-10-04",
        "studies": 2,
        "urgent": 1,
        "review": 0,
        "routine": 1,
        "not_scored": 0,
        "urgent_share": 0.5,
        "review_share": 0.0,
    }
    assert days[-3]["review"] == 1 and days[-4]["not_scored"] == 1 and days[0]["studies"] == 0
    text = format_status(report)
    assert "scores     UTC day 2024-10-04, model 5a5a5a5a5a5a" in text
    assert "pneumothorax         today   n 2, mean 0.49, median 0.05, >=review 50%" in text
    assert "  2024-10-04  n 2: urgent 1 (50%), review 0 (0%), routine 1, not_scored 0" in text
    assert "1.2.3.1" in text  # the last results list their studies; the tallies do not
    assert "1.2.3" not in json.dumps(report.scores)


def test_status_of_an_agent_that_has_counted_nothing_says_so_in_two_lines(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite3"
    Store(path).close()
    report = read_status(path, now=NOW)
    assert report.scores is not None and report.scores["model_sha256"] is None
    lines = [x for x in format_status(report).splitlines() if x.startswith(("scores", "levels"))]
    assert lines[0].startswith("scores     UTC day 2024-10-04, model -:")
    assert lines[1] == "levels     no study in the last 7 UTC days"
    assert "  no study scored in the last 7 days" in format_status(report)


def test_status_of_a_database_from_before_the_tallies_has_no_scores(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    Store(path).close()
    as_schema(path, 5)
    report = read_status(path)
    assert report.scores is None and "scores " not in format_status(report)
