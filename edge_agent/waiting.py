"""Studies whose scoring failed and that wait to be tried again.

A complete study whose result cannot be committed (the state disk is full, the database is
locked past its busy timeout, …) stays queued: it is tried again after 1 s, then after twice
as long each time, at most every 60 s, until it commits. Meanwhile the retained status
(``scoring_waiting``, ``scoring_waiting_studies``) and ``edge-agent status`` say which studies
wait and why.

``edge-agent status`` is another process and the database may be the thing that fails, so the
list is also kept in ``state_dir/scoring-waiting.json``: a file of fixed size, created at
start and then only overwritten in place, so that updating it needs no new disk space (it
still works when the state disk is full, on filesystems that overwrite in place, such as
ext4 or tmpfs). Its content is data: study UIDs and reasons, never patient data.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
FILE_NAME = "scoring-waiting.json"
FILE_SIZE = 16384
"""Bytes of the status file; the JSON is padded with spaces to this size."""
LISTED = 20
"""At most this many waiting studies are named (status and file); the count is exact."""
REASON_MAX = 300
"""Characters of a failure's text kept as its reason."""


def retry_delay(attempts: int) -> float:
    """Seconds to wait after ``attempts`` failed attempts (1, 2, 4, … capped at 60)."""
    return min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2.0 ** max(0, attempts - 1))


@dataclass
class Waiting:
    study_instance_uid: str
    reason: str
    since: float
    """Unix time of the first failure."""
    attempts: int
    due: float
    """``time.monotonic()`` of the next attempt."""


class ScoringWaits:
    """The waiting studies (thread-safe: the scoring thread writes, the status reads)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME
        self._lock = threading.Lock()
        self._waiting: dict[str, Waiting] = {}
        self._file_ok = True
        self._write()  # creates the file at its full size while there is room (start)

    def failed(self, uid: str, reason: str) -> tuple[Waiting, bool]:
        """Record one more failed attempt; (its entry, True when it is the first)."""
        with self._lock:
            entry = self._waiting.get(uid)
            first = entry is None
            if entry is None:
                entry = self._waiting[uid] = Waiting(uid, "", time.time(), 0, 0.0)
            entry.attempts += 1
            entry.reason = reason[:REASON_MAX]
            entry.due = time.monotonic() + retry_delay(entry.attempts)
        self._write()
        return entry, first

    def done(self, uid: str) -> Waiting | None:
        """``uid`` committed (or needs scoring no more): its entry, if it was waiting."""
        with self._lock:
            entry = self._waiting.pop(uid, None)
        if entry is not None:
            self._write()
        return entry

    def due(self, now: float) -> str | None:
        """The waiting study whose attempt is due soonest, if it is due at ``now``."""
        with self._lock:
            soonest = min(self._waiting.values(), key=lambda w: w.due, default=None)
            if soonest is None or soonest.due > now:
                return None
            return soonest.study_instance_uid

    def seconds_to_next(self, now: float) -> float | None:
        with self._lock:
            if not self._waiting:
                return None
            return max(0.0, min(w.due for w in self._waiting.values()) - now)

    def waiting(self, uid: str) -> bool:
        with self._lock:
            return uid in self._waiting

    def status_fields(self) -> dict[str, Any]:
        """``scoring_waiting`` (how many) and ``scoring_waiting_studies`` (oldest first)."""
        now_wall, now = time.time(), time.monotonic()
        with self._lock:
            entries = sorted(self._waiting.values(), key=lambda w: w.since)
        return {
            "scoring_waiting": len(entries),
            "scoring_waiting_studies": [
                {
                    "study_instance_uid": w.study_instance_uid,
                    "reason": w.reason,
                    "attempts": w.attempts,
                    "waiting_s": round(max(0.0, now_wall - w.since), 1),
                    "retry_in_s": round(max(0.0, w.due - now), 1),
                }
                for w in entries[:LISTED]
            ],
        }

    def close(self) -> None:
        """The agent stops: nothing waits any more (waiting studies are scored at next start)."""
        with self._lock:
            self._waiting.clear()
        self._write()

    def _write(self) -> None:
        fields = self.status_fields()
        body = {"pid": os.getpid(), "updated_at": time.time(), **fields}
        data = json.dumps(body).encode()
        while len(data) >= FILE_SIZE and body["scoring_waiting_studies"]:
            body["scoring_waiting_studies"] = body["scoring_waiting_studies"][:-1]
            data = json.dumps(body).encode()
        try:
            # Overwritten in place, never truncated: the same blocks are reused, so a full
            # disk does not stop the update. Readers tolerate a torn read (they retry).
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o640)
            try:
                os.pwrite(fd, data.ljust(FILE_SIZE - 1) + b"\n", 0)
            finally:
                os.close(fd)
        except OSError as exc:
            if self._file_ok:
                logger.warning(
                    "cannot update %s (%s); the retained status still says it",
                    self.path,
                    exc.strerror,
                )
            self._file_ok = False
        else:
            self._file_ok = True


def read_waiting(state_dir: Path) -> dict[str, Any] | None:
    """What ``scoring-waiting.json`` says, or None when it is absent or unreadable."""
    path = state_dir / FILE_NAME
    for _ in range(3):  # a read may meet a write half done
        try:
            body = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        if isinstance(body, dict) and isinstance(body.get("scoring_waiting"), int):
            return body
        return None
    return None
