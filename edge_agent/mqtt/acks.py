"""Acks from dashboards (``P/ack/{StudyInstanceUID}``): data from outside, checked at the door.

:func:`parse_ack` turns a message into an :class:`Ack` or refuses it with a short reason:
bounded payload (:data:`MAX_ACK_BYTES`), JSON of bounded depth, an ``alert_id`` of the shape
the agent gives its results (``results.is_alert_id``), a topic level that is a DICOM UID
(``dicom.uid.valid_uid``), and
``by``/``at`` as short text with control characters escaped (that is all that is stored).

:class:`AckLog` counts acks and keeps a flood of bad or unknown ones out of the log: the
first one in a quiet minute gets a warning line, the rest of that minute are only counted,
and one line per :data:`SUMMARY_SECONDS` at most says how many there were.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..dicom.uid import valid_uid
from ..results import is_alert_id
from ..text import printable

logger = logging.getLogger(__name__)

MAX_ACK_BYTES = 4096
"""An ack is ``{"alert_id", "by", "at"}``: a few hundred bytes. Larger payloads are refused."""
MAX_BY_CHARS = 128
MAX_AT_CHARS = 64
SUMMARY_SECONDS = 60.0


@dataclass(frozen=True)
class Ack:
    study_instance_uid: str
    alert_id: str
    by: str | None
    at: str | None


class AckRefused(ValueError):
    """The ack is not one the agent can act on; ``str(exc)`` says why, in a few words."""


def _text(ack: dict[str, Any], key: str, limit: int) -> str | None:
    value = ack.get(key)
    if not isinstance(value, str):
        return None
    if len(value) > limit:
        raise AckRefused(f"'{key}' longer than {limit} characters ({len(value)})")
    return printable(value, limit=limit * 4)  # escaped, never cut: the length was checked


def parse_ack(study_instance_uid: str, payload: bytes | bytearray) -> Ack:
    """The ack in ``payload`` received on the topic level ``study_instance_uid``; raises
    :class:`AckRefused`."""
    if len(payload) > MAX_ACK_BYTES:
        raise AckRefused(f"payload of {len(payload)} bytes (limit {MAX_ACK_BYTES})")
    if not payload:
        raise AckRefused("empty payload")
    if valid_uid(study_instance_uid) != study_instance_uid:
        raise AckRefused("the topic's last level is not a StudyInstanceUID")
    try:
        ack = json.loads(payload)
    except RecursionError as exc:
        raise AckRefused("JSON nested too deeply") from exc
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
        raise AckRefused("not JSON") from exc
    if not isinstance(ack, dict):
        raise AckRefused("not a JSON object")
    alert_id = ack.get("alert_id")
    if not isinstance(alert_id, str):
        raise AckRefused("no alert_id")
    if not is_alert_id(alert_id):
        raise AckRefused("alert_id is not an alert id of this agent (32 hex digits)")
    return Ack(
        study_instance_uid,
        alert_id,
        _text(ack, "by", MAX_BY_CHARS),
        _text(ack, "at", MAX_AT_CHARS),
    )


class AckLog:
    """Counts acks; logs refused and unknown ones rate-limited. Thread-safe.

    Counters: ``acks_received`` (well-formed, naming an urgent alert of this agent, whether
    new, already acknowledged or superseded), ``acks_unknown`` (well-formed, for no urgent
    alert of this agent), ``acks_refused`` (malformed or over-size).
    """

    def __init__(
        self, every: float = SUMMARY_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = {"acks_received": 0, "acks_unknown": 0, "acks_refused": 0}
        self._taken: dict[str, int] = {}
        self._last_line = -float("inf")
        self._quiet = {"acks_unknown": 0, "acks_refused": 0}  # counted since the last line

    def counters(self) -> dict[str, int]:
        """Counts since the process started."""
        with self._lock:
            return dict(self._counts)

    def take(self) -> dict[str, int]:
        """Counts since the previous take() (to add to the stored counters)."""
        with self._lock:
            now = dict(self._counts)
            taken, self._taken = {k: v - self._taken.get(k, 0) for k, v in now.items()}, now
            return taken

    def untake(self, taken: dict[str, int]) -> None:
        """Storing what take() returned failed: the next take() returns it again."""
        with self._lock:
            for k, v in taken.items():
                self._taken[k] = self._taken.get(k, 0) - v

    def received(self) -> None:
        with self._lock:
            self._counts["acks_received"] += 1

    def refused(self, study_instance_uid: str, reason: str) -> None:
        self._note("acks_refused", "ignoring an ack on study %s: %s", study_instance_uid, reason)

    def unknown(self, ack: Ack) -> None:
        self._note(
            "acks_unknown",
            "ignoring an ack on study %s: alert %s is not an urgent alert of this agent",
            ack.study_instance_uid,
            ack.alert_id,
        )

    def _note(self, counter: str, message: str, uid: str, detail: str) -> None:
        now = self._clock()
        with self._lock:
            self._counts[counter] += 1
            if now - self._last_line < self._every:
                self._quiet[counter] += 1
                return
            self._last_line = now
        logger.warning(
            message + " (more within %.0f s are counted, not logged)",
            printable(uid, 80),
            printable(detail, 120),
            self._every,
        )

    def flush(self) -> None:
        """Log how many acks were ignored without a line, once :data:`SUMMARY_SECONDS` have
        passed since the last line (the drain thread calls this every second or so)."""
        now = self._clock()
        with self._lock:
            if not any(self._quiet.values()) or now - self._last_line < self._every:
                return
            refused, unknown = self._quiet["acks_refused"], self._quiet["acks_unknown"]
            self._quiet = {"acks_unknown": 0, "acks_refused": 0}
            self._last_line = now
        logger.warning(
            "ignored %d more acks in the last %.0f s: %d malformed or over-size, %d for no "
            "urgent alert of this agent",
            refused + unknown,
            self._every,
            refused,
            unknown,
        )
