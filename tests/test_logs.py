"""Logging: journald's native protocol received on a real datagram socket standing in for
journald, the text form elsewhere, and the field whitelist that keeps PHI out."""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

import pytest

from edge_agent.logs import (
    JournalHandler,
    TextFormatter,
    fields,
    journal_message,
    make_handler,
    priority,
)


def parse(datagram: bytes) -> dict[str, str]:
    """journald's side of the native protocol."""
    out: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        end = datagram.index(b"\n", i)
        line = datagram[i:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            out[key.decode()] = value.decode()
            i = end + 1
        else:
            (size,) = struct.unpack("<Q", datagram[end + 1 : end + 9])
            out[line.decode()] = datagram[end + 9 : end + 9 + size].decode()
            i = end + 9 + size + 1
    return out


@pytest.fixture
def journal(tmp_path: Path):
    path = tmp_path / "journal.socket"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    yield path, server
    server.close()


def test_records_reach_the_journal_with_structured_fields(journal) -> None:
    path, server = journal
    handler = make_handler({"JOURNAL_STREAM": "8:1234"}, journal_socket=path)
    assert isinstance(handler, JournalHandler)
    log = logging.getLogger("edge_agent.test_logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.warning(
            "published",
            extra=fields(study_uid="1.2.3", alert_id="ab12", stage="publish", duration_ms=12),
        )
        got = parse(server.recv(65536))
        try:
            raise ValueError("line one\nline two")
        except ValueError:
            log.exception("scoring failed", extra=fields(study_uid="1.2.3"))
        failed = parse(server.recv(65536))
    finally:
        log.removeHandler(handler)
        handler.close()
    assert got["MESSAGE"] == "published" and got["PRIORITY"] == "4"
    assert got["SYSLOG_IDENTIFIER"] == "edge-agent" and got["LOGGER"] == "edge_agent.test_logs"
    assert got["EDGE_STUDY_UID"] == "1.2.3" and got["EDGE_ALERT_ID"] == "ab12"
    assert got["EDGE_STAGE"] == "publish" and got["EDGE_DURATION_MS"] == "12"
    assert got["CODE_FUNC"] == "test_records_reach_the_journal_with_structured_fields"
    # Multi-line values (tracebacks) use the binary form and arrive whole.
    assert failed["PRIORITY"] == "3" and "line one\nline two" in failed["MESSAGE"]
    assert "Traceback" in failed["MESSAGE"]


def test_without_journald_lines_go_to_stderr_with_key_values(tmp_path: Path) -> None:
    handler = make_handler({}, journal_socket=tmp_path / "absent")
    assert not isinstance(handler, JournalHandler)
    record = logging.LogRecord("edge_agent.x", logging.INFO, __file__, 1, "scored", None, None)
    record.__dict__.update(fields(study_uid="1.2.3", triage="urgent"))
    line = TextFormatter(timestamps=False).format(record)
    assert line == "INFO edge_agent.x: scored study_uid=1.2.3 triage=urgent"
    # Under systemd but without journald's socket: lines without our own timestamps.
    assert make_handler({"JOURNAL_STREAM": "8:1"}, tmp_path / "absent").formatter is not None


def test_only_whitelisted_fields_exist() -> None:
    with pytest.raises(ValueError, match="not a log field"):
        fields(patient_name="DOE^JANE")
    with pytest.raises(ValueError, match="not a log field"):
        fields(patient_id="123")
    assert fields(study_uid=None) == {"edge_fields": {}}


def test_priorities_follow_syslog() -> None:
    assert [priority(x) for x in (50, 40, 30, 20, 10)] == [2, 3, 4, 6, 7]


def test_a_send_failure_falls_back_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = JournalHandler(tmp_path / "gone.socket")
    record = logging.LogRecord("edge_agent.x", logging.ERROR, __file__, 1, "lost?", None, None)
    handler.handle(record)
    handler.close()
    assert "ERROR edge_agent.x: lost?" in capsys.readouterr().err
    assert b"MESSAGE=lost?\n" in journal_message(record, "edge-agent")
