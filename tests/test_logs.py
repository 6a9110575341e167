"""Logging: journald's native protocol received on a real datagram socket standing in for
journald, the text form elsewhere, and the field whitelist that keeps PHI out."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.logs import (
    JournalHandler,
    TextFormatter,
    escape_controls,
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


# -- what comes from outside is shown, never obeyed --------------------------------------------

HOSTILE = "x\x1b]0;owned\x07\x1b[2J\nFAKE ERROR line\r\u202etxt.dcm"


def test_text_lines_show_control_characters_escaped() -> None:
    record = logging.LogRecord(
        "edge_agent.x", logging.WARNING, __file__, 1, "rejected %s: %s", (HOSTILE, "bad"), None
    )
    record.__dict__.update(fields(study_uid="1.2.3\n", stage="intake"))
    line = TextFormatter(timestamps=False).format(record)
    assert line == (
        "WARNING edge_agent.x: rejected x\\x1b]0;owned\\x07\\x1b[2J\\nFAKE ERROR line\\r"
        "\\u202etxt.dcm: bad study_uid=1.2.3\\n stage=intake"
    )
    assert "\n" not in line and "\x1b" not in line


def test_a_traceback_keeps_its_lines_but_not_the_escapes(tmp_path: Path) -> None:
    try:
        raise OSError(f"cannot open {HOSTILE}")
    except OSError:
        record = logging.LogRecord(
            "edge_agent.x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    text = TextFormatter(timestamps=False).format(record)
    assert text.startswith("ERROR edge_agent.x: failed\nTraceback (most recent call last):")
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert "cannot open x\\x1b]0;owned\\x07\\x1b[2J" in text
    journal = parse(journal_message(record, "edge-agent"))
    assert "\x1b" not in journal["MESSAGE"] and "Traceback" in journal["MESSAGE"]


def test_journal_records_show_control_characters_escaped(journal) -> None:
    path, server = journal
    handler = make_handler({"JOURNAL_STREAM": "8:1"}, journal_socket=path)
    record = logging.LogRecord(
        "edge_agent.x", logging.INFO, __file__, 1, "skipped %s", (HOSTILE,), None
    )
    record.__dict__.update(fields(sop_uid="1.2\x1b"))
    handler.handle(record)
    got = parse(server.recv(65536))
    handler.close()
    assert got["MESSAGE"] == (
        "skipped x\\x1b]0;owned\\x07\\x1b[2J\\nFAKE ERROR line\\r\\u202etxt.dcm"
    )
    assert got["EDGE_SOP_UID"] == "1.2\\x1b"


def test_escape_controls_leaves_printable_text_alone() -> None:
    for text in ("plain", "DOE^JANE 19700101/é 日本.dcm", "a\\b", ""):
        assert escape_controls(text) == text
    assert escape_controls("\x00\x7f\x9b\udcff") == "\\x00\\x7f\\x9b\\udcff"
    assert escape_controls("a\n\x1bb", keep_newlines=True) == "a\n\\x1bb"


# -- pydicom's warnings quote element values: never in our log, whatever the import order ------

PYDICOM_ORDERS = {
    # the daemon's order: logging first (edge-agent run), pydicom imported by the service,
    # which resets the "pydicom" logger to WARNING
    "logging first": "from edge_agent.cli import setup_logging\nsetup_logging('DEBUG')\n"
    "import pydicom\n",
    "pydicom first": "import pydicom\nfrom edge_agent.cli import setup_logging\n"
    "setup_logging('DEBUG')\n",
}


@pytest.mark.parametrize("order", sorted(PYDICOM_ORDERS))
def test_pydicom_warnings_never_reach_the_log(tmp_path: Path, order: str) -> None:
    from edge_agent.simulate import simulate

    (study,) = simulate(tmp_path / "in", studies=1, seed=2, rows=64, cols=64)
    path = study.paths[0]
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = "9.9.9.99"
    ds.save_as(path)
    path.write_bytes(path.read_bytes().replace(b"9.9.9.99", b"DOE^JANE"))  # PHI in a UI
    code = PYDICOM_ORDERS[order] + (
        "import logging\n"
        f"ds = pydicom.dcmread({str(path)!r})\n"
        "str(ds.StudyInstanceUID)  # pydicom warns, quoting the value\n"
        "pydicom.config.debug(True, False)  # even its debug mode\n"
        f"pydicom.dcmread({str(path)!r}).StudyInstanceUID\n"
        "logging.getLogger('edge_agent.test').warning('ours still logged')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"},
    )
    assert run.returncode == 0, run.stderr
    assert "WARNING edge_agent.test: ours still logged" in run.stderr
    assert "DOE" not in run.stderr and "DOE" not in run.stdout, run.stderr
    assert "pydicom" not in run.stderr, run.stderr


@given(st.text())
def test_escaped_text_holds_no_control_or_invisible_character(text: str) -> None:
    import unicodedata

    for keep in (False, True):
        shown = escape_controls(text, keep_newlines=keep)
        bad = {"Cc", "Cf", "Zl", "Zp", "Cs"}
        assert all(unicodedata.category(c) not in bad or (keep and c == "\n") for c in shown)
        shown.encode("utf-8")  # printable anywhere: no lone surrogate left
        if text.isprintable():
            assert shown == text
