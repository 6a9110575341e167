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

What comes from outside is data, also in a log line: file names, element values and peer
titles can hold terminal escapes or newlines. Both formats pass every message, field and
traceback through :func:`escape_controls`, so ``\x1b`` and ``\n`` are shown escaped and one
record stays one line (a traceback keeps its own line breaks).

pydicom's warnings about non-conforming files quote element values, which may be patient
data. :class:`PydicomFilter`, on the handler itself, drops them (and ``warnings`` they
raise) whatever pydicom does to its own logger: ``import pydicom`` resets that logger's
level, so a level set before the import does not hold. Our reject reasons say what was
wrong without quoting values.
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

from .text import escape_controls

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


class PydicomFilter(logging.Filter):
    """Drops pydicom's records and the Python warnings it raises (they quote element
    values); counts them in ``dropped``. Set on a handler, so no logger level matters."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name == "pydicom" or name.startswith("pydicom."):
            self.dropped += 1
            return False
        if name == "py.warnings" and _from_pydicom(record):
            self.dropped += 1
            return False
        return True


def _from_pydicom(record: logging.LogRecord) -> bool:
    """A captured warning raised inside pydicom (its text starts with pydicom's file)."""
    try:
        text = record.getMessage()
    except Exception:  # a record that cannot be formatted: not ours to judge here
        return False
    return f"{os.sep}pydicom{os.sep}" in text.split(":", 1)[0]


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

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return escape_controls(super().formatException(ei), keep_newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return escape_controls(super().formatStack(stack_info), keep_newlines=True)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = record_fields(record)
        if extra:
            first, sep, rest = line.partition("\n")
            pairs = " ".join(f"{k}={escape_controls(v)}" for k, v in extra.items())
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
    message = escape_controls(record.getMessage())
    if record.exc_info:
        trace = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        message += "\n" + escape_controls(trace, keep_newlines=True)
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
    parts += [(f"EDGE_{k.upper()}", escape_controls(v)) for k, v in record_fields(record).items()]
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
    """The journal when systemd connected our output to it, else lines on stderr; either
    way without pydicom's records (:class:`PydicomFilter`)."""
    env = os.environ if environ is None else environ
    handler: logging.Handler
    if env.get("JOURNAL_STREAM") and journal_socket.exists():
        handler = JournalHandler(journal_socket)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(TextFormatter(timestamps=not env.get("JOURNAL_STREAM")))
    handler.addFilter(PydicomFilter())
    return handler
