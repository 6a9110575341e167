"""Logging for a person at a terminal and for journald, with structured fields.

Log calls that concern a study pass its identifiers with :func:`fields`::

    logger.info("study scored", extra=fields(study_uid=uid, stage="score", duration_ms=412))

Under systemd (``$JOURNAL_STREAM`` set and journald's socket present) every record goes to
the journal over its native protocol (systemd.journal-fields(7)), one datagram per record:
``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER``, ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``,
``LOGGER``, ``THREAD_NAME`` and the study fields as ``EDGE_STUDY_UID``, ``EDGE_ALERT_ID``,
``EDGE_STAGE``, ``EDGE_DURATION_MS``… so that ``journalctl -u edge-agent EDGE_STUDY_UID=…``
finds everything about one study. Elsewhere records are lines on stderr with the fields
appended as ``key=value``.

Only the keys of :data:`FIELDS` are accepted: identifiers the contract already publishes
(UIDs, alert ids) and measurements, never patient name, ID or birth date.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import traceback
from pathlib import Path
from typing import Any

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
FIELDS = frozenset(
    {"study_uid", "sop_uid", "alert_id", "revision", "stage", "duration_ms", "triage", "count"}
)
_EXTRA = "edge_fields"
# journald takes datagrams up to its socket buffer; longer messages (tracebacks) are cut.
MAX_MESSAGE = 48_000
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def fields(**values: Any) -> dict[str, dict[str, str]]:
    """``extra=`` for a log call: the study's identifiers and measurements.

    Unknown keys are a programming error (ValueError): the whitelist is what keeps patient
    data out of the journal's indexed fields."""
    unknown = set(values) - FIELDS
    if unknown:
        raise ValueError(f"not a log field: {sorted(unknown)} (allowed: {sorted(FIELDS)})")
    return {_EXTRA: {k: str(v) for k, v in values.items() if v is not None}}


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    value = getattr(record, _EXTRA, None)
    return dict(value) if isinstance(value, dict) else {}


def priority(levelno: int) -> int:
    """syslog priority of a logging level (CRITICAL 2 … DEBUG 7)."""
    if levelno >= logging.CRITICAL:
        return 2
    for level in (logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message key=value …``; with a timestamp unless journald adds one."""

    def __init__(self, timestamps: bool = True) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        super().__init__(f"%(asctime)s {fmt}" if timestamps else fmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = record_fields(record)
        if extra:
            first, sep, rest = line.partition("\n")
            pairs = " ".join(f"{k}={v}" for k, v in extra.items())
            line = f"{first} {pairs}{sep}{rest}"
        return line


def _encode(name: str, value: str) -> bytes:
    data = value.encode("utf-8", errors="replace")
    if b"\n" not in data:
        return name.encode() + b"=" + data + b"\n"
    # A value with newlines: name, newline, little-endian 64-bit length, the bytes, newline.
    return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


def journal_message(record: logging.LogRecord, identifier: str) -> bytes:
    """One record in journald's native protocol."""
    message = record.getMessage()
    if record.exc_info:
        message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + " …(cut)"
    parts = [
        ("MESSAGE", message),
        ("PRIORITY", str(priority(record.levelno))),
        ("SYSLOG_IDENTIFIER", identifier),
        ("LOGGER", record.name),
        ("THREAD_NAME", record.threadName or ""),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", str(record.lineno)),
        ("CODE_FUNC", record.funcName),
    ]  # empty or None values are left out
    parts += [(f"EDGE_{k.upper()}", v) for k, v in record_fields(record).items()]
    return b"".join(_encode(k, str(v)) for k, v in parts if v not in (None, ""))


class JournalHandler(logging.Handler):
    """Sends records to journald's native socket; falls back to stderr if a send fails."""

    def __init__(self, path: Path = JOURNAL_SOCKET, identifier: str = "edge-agent") -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._fallback = logging.StreamHandler(sys.stderr)
        self._fallback.setFormatter(TextFormatter(timestamps=False))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = journal_message(record, self.identifier)
        except Exception:  # a record that cannot be encoded must not break the caller
            self.handleError(record)
            return
        try:
            self._sock.sendto(data, str(self.path))
        except OSError:
            self._fallback.handle(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


def make_handler(
    environ: dict[str, str] | None = None, journal_socket: Path = JOURNAL_SOCKET
) -> logging.Handler:
    """The journal when systemd connected our output to it, else lines on stderr."""
    env = os.environ if environ is None else environ
    if env.get("JOURNAL_STREAM") and journal_socket.exists():
        return JournalHandler(journal_socket)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter(timestamps=not env.get("JOURNAL_STREAM")))
    return handler
